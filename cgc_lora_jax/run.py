"""A run folder and everything a stage needs from it: config, task vocabulary, data, base, adapters.

Training writes a run folder; evaluation, the baselines, 1+N serving and export read it:

    WORKDIR/config.json        the resolved config                  load_run_config
    WORKDIR/task_vocab.json    task name -> task ID                  read_data (it wins over data.tasks)
    WORKDIR/data/              a generated dataset (the demo's)      data_folder
    WORKDIR/tokenizer/         a built-in base's tokenizer           load_base
    WORKDIR/adapters/          trained adapters + meta.json          save_adapters / attach_adapters

The frozen base is never copied into a run: its path and a fingerprint (config.json and, per
weight file, name, size and a hash of its first and last MiB) are recorded, and adapters refuse a
base with another fingerprint (BaseMismatchError).

    cfg = load_run_config("runs/demo")
    splits, vocab = read_data(cfg.data, Path("runs/demo"), seed=cfg.train.seed, splits=("test",),
                              prediction_splits=("test",))
    base = load_base(cfg.model, lora=None)                  # BaseModel: model, params, tokenizer
    run = attach_adapters(base, "runs/demo")               # AdapterSet: the model with `lora`
    prompts = encode(cfg.data, list(splits.datasets["test"]), run.base, vocab, for_prediction=True)

`model.builtin = "tiny-chatglm"` is a seeded, randomly initialised ChatGLM-6B-architecture model
(2 blocks, width 128) with the demo's character tokenizer: it needs no download, and its
fingerprint depends only on its config and seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import traverse_util

from cgc_lora_jax.data.task_vocab import TaskVocab
from cgc_lora_jax.demo import english
from cgc_lora_jax.demo.dataset import write_demo_dataset
from cgc_lora_jax.layers import CGCLoRAConfig, init_adapters
from cgc_lora_jax.params import is_adapter_path, join_params, split_params
from cgc_lora_jax.sharding import match_partition_rules, named_shardings

VOCAB_FILE = "task_vocab.json"
ADAPTERS_DIR = "adapters"
BUILTIN_PREFIX = "builtin:"  # base "path" of a built-in base, e.g. builtin:tiny-chatglm
BUILTIN_SEED = 0
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MIB = 1 << 20
GENERATED_DATASETS = {  # data.format -> writer of a dataset made on first use
    "demo": write_demo_dataset,  # short Chinese tasks for the tiny random base (configs/demo_tiny.py)
    "demo_en": english.write_dataset,  # English reading tasks for the real base (configs/demo.py)
}
OBTAIN_CHATGLM = (
    "Download THUDM/chatglm-6b (or chatglm2-6b / chatglm3-6b) from the Hugging Face Hub on a machine "
    "with network access, e.g. `huggingface-cli download THUDM/chatglm-6b --local-dir checkpoints/chatglm-6b`, "
    "copy the folder (config.json, ice_text.model or tokenizer.model, pytorch_model*.bin or "
    "*.safetensors) here, and pass it as --config.model.path=FOLDER"
)


class RunError(ValueError):
    """A run that cannot be used as asked (not a run folder, a layout the method cannot use)."""


class BaseMismatchError(RuntimeError):
    """Adapters or a checkpoint trained on another base than the one at hand."""


# --- config, data ---------------------------------------------------------------------------


def load_run_config(workdir: str | Path) -> ml_collections.ConfigDict:
    workdir = Path(workdir)
    path = workdir / "config.json"
    if not workdir.is_dir():
        raise FileNotFoundError(f"{workdir} does not exist: pass the --workdir of a training run")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {workdir} is not a training run's workdir")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def lora_config(lora_cfg, num_tasks: int) -> CGCLoRAConfig:
    """The CGC-LoRA layer config of a config's `lora` section, for `num_tasks` tasks."""
    return CGCLoRAConfig(num_tasks=num_tasks, **lora_cfg.to_dict())


def data_folder(data_cfg, workdir: Path) -> Path:
    """data.path; a generated dataset (data.format "demo" or "demo_en") is written on first use into
    data.path, or WORKDIR/data when data.path is empty."""
    generate = GENERATED_DATASETS.get(data_cfg.format)
    if generate is None:
        if not data_cfg.path:
            raise FileNotFoundError(f"data.path is empty: name the folder holding train.json, dev.json and test.json "
                                    f"(data.format={data_cfg.format!r}) with --config.data.path=FOLDER")
        return Path(data_cfg.path)
    folder = Path(data_cfg.path) if data_cfg.path else Path(workdir) / "data"
    if not (folder / "train.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        generate(folder, seed=0)
    return folder


def read_data(data_cfg, workdir: Path, *, seed: int, splits=("train", "dev"), prediction_splits=()) -> tuple:
    """(Splits, vocab) of a config's data section: the run's saved task vocabulary wins over
    data.tasks; `seed` (the run's train.seed) draws the capped subsets."""
    from cgc_lora_jax.data.records import load_splits

    vocab_file = Path(workdir) / VOCAB_FILE
    vocab = TaskVocab.load(vocab_file) if vocab_file.is_file() else None
    caps = {"train": data_cfg.max_train_per_task or None, "dev": data_cfg.max_eval_per_task or None,
            "test": data_cfg.max_eval_per_task or None}
    extra = {}
    if data_cfg.format == "jsonl":
        extra = dict(input_field=data_cfg.input_field, target_field=data_cfg.target_field, task_field=data_cfg.task_field)
    splits = load_splits(
        data_folder(data_cfg, workdir), data_format=data_cfg.format, splits=splits, prediction_splits=prediction_splits,
        tasks=tuple(data_cfg.tasks) or None, vocab=vocab, max_per_task=caps, seed=seed,
        on_error=data_cfg.on_error, **extra,
    )
    return splits, splits.vocab


def encode(data_cfg, records, base, vocab, for_prediction=False):
    """An EncodedSplit of `records` in the base's prompt format, truncated to data_cfg's budgets."""
    from cgc_lora_jax.data.formatting import encode_split

    return encode_split(records, base.tokenizer, family=base.family, vocab=vocab, max_source_len=data_cfg.max_source_len,
                        max_target_len=data_cfg.max_target_len, for_prediction=for_prediction,
                        prompt_format=data_cfg.prompt_format,
                        truncate_where=data_cfg.get("truncate", "end"))


# --- the frozen base ------------------------------------------------------------------------


@dataclasses.dataclass
class BaseModel:
    family: str  # model family name, e.g. "chatglm"
    model: Any  # the Flax module (with adapters when `lora` was given)
    params: dict  # base parameters, plus freshly initialised adapters when `lora` was given
    tokenizer: Any
    info: dict  # {"path": ..., "fingerprint": ...}: recorded in checkpoints, checked on resume


def fingerprint_base(path: str | Path) -> str:
    """A cheap identity of a Hugging Face folder or a GGUF file (no full read of a 12 GB checkpoint)."""
    folder = Path(path)
    digest = hashlib.sha256()
    for file in sorted(folder.iterdir()) if folder.is_dir() else [folder]:  # or one .gguf file
        if file.name == "config.json" or file.suffix in (".json", ".model"):
            digest.update(file.name.encode() + file.read_bytes())
        elif file.suffix in (".bin", ".safetensors", ".gguf"):
            size = file.stat().st_size
            digest.update(f"{file.name}:{size}".encode())
            with open(file, "rb") as f:
                digest.update(f.read(MIB))
                f.seek(max(size - MIB, 0))
                digest.update(f.read(MIB))
    return digest.hexdigest()


def tiny_chatglm_config(vocab_size: int) -> dict:
    # Embedding rows padded to a multiple of 64 so any mesh axis up to 64 divides them.
    return {
        "model_type": "chatglm", "architectures": ["ChatGLMModel"], "vocab_size": -(-vocab_size // 64) * 64,
        "hidden_size": 128, "num_layers": 2, "num_attention_heads": 4, "inner_hidden_size": 512,
        "layernorm_epsilon": 1e-5, "max_sequence_length": 512, "position_encoding_2d": True,
        "pad_token_id": 1, "mask_token_id": 2, "gmask_token_id": 3, "bos_token_id": 4, "eos_token_id": 5,
        "torch_dtype": "float32",
    }


def _dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(family: str, path: str | os.PathLike):
    """The tokenizer in local folder `path` for `family`: the demo tokenizer when the folder
    holds demo_tokenizer.json, models/chatglm_tokenizer for ChatGLM, the GGUF metadata's for a
    .gguf file (or a folder holding one and no tokenizer.json), else transformers' AutoTokenizer
    (offline)."""
    from cgc_lora_jax.data.formatting import layout_of
    from cgc_lora_jax.demo.tokenizer import DemoTokenizer
    from cgc_lora_jax.models.chatglm_tokenizer import CHATGLM_VERSIONS
    from cgc_lora_jax.models.chatglm_tokenizer import load_tokenizer as load_chatglm_tokenizer
    from cgc_lora_jax.models.gguf import find_gguf

    layout_of(family)
    gguf_file = find_gguf(path)
    if gguf_file is not None and not (Path(path) / "tokenizer.json").is_file():
        from cgc_lora_jax.models.gguf_tokenizer import gguf_tokenizer

        return gguf_tokenizer(gguf_file)
    if DemoTokenizer.is_saved_in(path):
        return DemoTokenizer.load(path)
    if family in CHATGLM_VERSIONS:
        return load_chatglm_tokenizer(path, version=CHATGLM_VERSIONS[family])
    if not Path(path).is_dir():
        raise FileNotFoundError(f"tokenizer folder {path} does not exist")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _load_builtin(model_cfg, lora, mesh, workdir, seed) -> BaseModel:
    from cgc_lora_jax.demo.tokenizer import DemoTokenizer
    from cgc_lora_jax.models import chatglm
    from cgc_lora_jax.models.family import check_lora_targets, with_default_targets

    if model_cfg.builtin != "tiny-chatglm":
        raise ValueError(f"model.builtin={model_cfg.builtin!r}: the only built-in base is 'tiny-chatglm'")
    tokenizer = DemoTokenizer.build()
    if workdir is not None:
        tokenizer.save(Path(workdir) / "tokenizer")
    hf = tiny_chatglm_config(tokenizer.vocab_size)
    dtype = _dtype(model_cfg.dtype)
    lora = with_default_targets(chatglm.FAMILY, lora)
    model = chatglm.build(chatglm.ChatGLMConfig.from_hf(hf), dtype=dtype, param_dtype=dtype, lora=lora, remat=model_cfg.remat)
    ids = jnp.asarray([tokenizer.encode("你好")], jnp.int32)
    task_ids = None if lora is None else jnp.zeros((1,), jnp.int32)
    params = jax.jit(lambda key: model.init(key, ids, None, task_ids)["params"])(jax.random.key(BUILTIN_SEED))
    check_lora_targets(chatglm.FAMILY, lora, traverse_util.flatten_dict(params))
    if lora is not None:  # the base from BUILTIN_SEED, the adapters from the run's seed, as for a loaded base
        base, adapters = split_params(params)
        params = join_params(base, traverse_util.unflatten_dict(init_adapters(traverse_util.flatten_dict(adapters), lora, seed)))
    if mesh is not None:
        params = jax.device_put(params, named_shardings(mesh, match_partition_rules(chatglm.PARTITION_RULES, params)))
    fingerprint = hashlib.sha256(json.dumps([hf, BUILTIN_SEED, model_cfg.dtype], sort_keys=True).encode()).hexdigest()
    return BaseModel("chatglm", model, params, tokenizer, {"path": "builtin:tiny-chatglm", "fingerprint": fingerprint})


def load_base(model_cfg, *, lora: CGCLoRAConfig | None, mesh=None, workdir=None, seed: int = 0,
              with_tokenizer: bool = True) -> BaseModel:
    """The base of `model_cfg` (path / builtin / dtype / remat), with fresh adapters if `lora`.

    with_tokenizer=False: an HF folder needs no tokenizer files (BaseModel.tokenizer is None).
    """
    if model_cfg.builtin:
        return _load_builtin(model_cfg, lora, mesh, workdir, seed)
    from cgc_lora_jax.hub import resolve_model_path
    from cgc_lora_jax.models.family import detect_family
    from cgc_lora_jax.models.gguf import find_gguf
    from cgc_lora_jax.models.hf_io import load_pretrained, read_hf_config

    path = resolve_model_path(model_cfg.path)  # hub:NAME is fetched into the cache on first use
    if find_gguf(path) is None and not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.path={str(path)!r} holds no config.json or .gguf file. {OBTAIN_CHATGLM}")
    family = detect_family(read_hf_config(path), source=str(find_gguf(path) or path / "config.json"))
    model, params = load_pretrained(path, _dtype(model_cfg.dtype), lora=lora, remat=model_cfg.remat, mesh=mesh, seed=seed)
    tokenizer = load_tokenizer(family.name, path) if with_tokenizer else None
    return BaseModel(family.name, model, params, tokenizer, {"path": str(path.resolve()), "fingerprint": fingerprint_base(path)})


def answering_model_config(cfg) -> ml_collections.ConfigDict:
    """cfg.model as answers are generated: eval.dtype, when set, replaces model.dtype (a run trained
    in bfloat16 can answer in float32, where rounding flips fewer greedy tokens)."""
    if not cfg.eval.get("dtype"):
        return cfg.model
    return ml_collections.ConfigDict({**cfg.model.to_dict(), "dtype": cfg.eval.dtype})


def load_frozen_base(path: str, *, dtype: str = "float32", with_tokenizer: bool = False) -> BaseModel:
    """The plain base (no adapters) at `path`: an HF folder or "builtin:NAME"."""
    builtin = path[len(BUILTIN_PREFIX):] if path.startswith(BUILTIN_PREFIX) else ""
    model_cfg = ml_collections.ConfigDict({"path": "" if builtin else path, "builtin": builtin, "dtype": dtype, "remat": False})
    return load_base(model_cfg, lora=None, with_tokenizer=with_tokenizer)


# --- adapters -------------------------------------------------------------------------------


def save_adapters(directory: str | Path, adapters, meta: dict) -> Path:
    """The trained adapters and gate as a standalone orbax checkpoint, plus meta as JSON."""
    directory = Path(directory).resolve()
    with ocp.StandardCheckpointer() as checkpointer:  # all hosts together, like a checkpoint
        checkpointer.save(directory / "params", adapters, force=True)
    if jax.process_index() == 0:
        tmp = directory / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
        tmp.replace(directory / "meta.json")
    return directory


def load_adapters(directory: str | Path, abstract_adapters=None) -> tuple[object, dict]:
    directory = Path(directory).resolve()
    if not (directory / "meta.json").is_file():
        raise FileNotFoundError(f"{directory}: no meta.json; not an adapters folder written by save_adapters")
    meta = json.loads((directory / "meta.json").read_text())
    with ocp.StandardCheckpointer() as checkpointer:
        adapters = checkpointer.restore(directory / "params", abstract_adapters)
    return adapters, meta


@dataclasses.dataclass
class AdapterSet:
    """A trained adapter set on its base: the model (with adapters) and base + adapter params."""

    base: BaseModel  # model (with `lora`), params (base + trained adapters), family, info
    lora: CGCLoRAConfig
    vocab: TaskVocab
    meta: dict  # the adapters' meta.json
    dtype: str  # "float32" | "bfloat16"

    @property
    def params(self) -> dict:
        return self.base.params


def adapter_shapes(model) -> dict:
    """The adapter subtree of `model` (a model with `lora`) as ShapeDtypeStructs, from
    eval_shape: what an adapter checkpoint restores into, with nothing initialised."""
    from cgc_lora_jax.models.hf_io import abstract_params

    flat = abstract_params(model, with_adapters=True)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return traverse_util.unflatten_dict({
        p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device) for p, s in flat.items() if is_adapter_path(p)})


def read_adapter_meta(folder: str | Path) -> tuple[Path, dict, CGCLoRAConfig, TaskVocab, str]:
    """(adapters folder, meta, lora config, vocab, dtype) of a run workdir (its adapters/) or an
    orbax export folder."""
    folder = Path(folder)
    adapters_dir = folder / ADAPTERS_DIR if (folder / ADAPTERS_DIR / "meta.json").is_file() else folder
    if not (adapters_dir / "meta.json").is_file():
        raise FileNotFoundError(f"{folder}: neither a training run (adapters/meta.json) nor an "
                                "exported adapter set (meta.json)")
    meta = json.loads((adapters_dir / "meta.json").read_text())
    vocab = TaskVocab(meta["task_vocab"])
    if "lora" in meta:  # an orbax export
        lora, dtype = CGCLoRAConfig(**meta["lora"]), meta["model"]["dtype"]
    else:  # a training run: meta["config"] is the run's resolved config
        lora = CGCLoRAConfig(num_tasks=len(vocab), **meta["config"]["lora"])
        dtype = meta["config"]["model"]["dtype"]
    run_vocab = folder / VOCAB_FILE
    if run_vocab.is_file() and TaskVocab.load(run_vocab) != vocab:
        raise ValueError(f"{run_vocab} and {adapters_dir / 'meta.json'} name different tasks")
    return adapters_dir, meta, lora, vocab, dtype


def attach_adapters(base: BaseModel, folder: str | Path) -> AdapterSet:
    """The adapter set in `folder` (a run workdir or an orbax export) on an already loaded plain
    base: the base's parameter arrays are shared, not copied. The base's fingerprint must be the
    one recorded at training."""
    adapters_dir, meta, lora, vocab, dtype = read_adapter_meta(folder)
    if base.info["fingerprint"] != meta["base"]["fingerprint"]:
        raise BaseMismatchError(
            f"{adapters_dir} was trained on base {meta['base']['path']!r} (fingerprint "
            f"{meta['base']['fingerprint'][:12]}), but {base.info['path']!r} has fingerprint "
            f"{base.info['fingerprint'][:12]}")
    from cgc_lora_jax.models.family import FAMILIES, with_default_targets

    lora = with_default_targets(FAMILIES[base.family], lora)  # a run's lora.targets may be ""
    model = base.model.clone(lora=lora)
    adapters, _ = load_adapters(adapters_dir, adapter_shapes(model))
    with_adapters = BaseModel(base.family, model, join_params(base.params, adapters), base.tokenizer, base.info)
    return AdapterSet(with_adapters, lora, vocab, meta, dtype)


def load_adapter_set(folder: str | Path, base_path: str | None = None) -> AdapterSet:
    """A run's (or an orbax export's) adapters on a freshly loaded base.

    base_path: where the base is now (default: the path recorded at training).
    """
    _, meta, _, _, dtype = read_adapter_meta(folder)
    return attach_adapters(load_frozen_base(str(base_path or meta["base"]["path"]), dtype=dtype), folder)
