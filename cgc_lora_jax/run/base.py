"""The frozen base of a run: a Hugging Face folder, a GGUF file, hub:NAME or a built-in base, with
its tokenizer and, for training, freshly initialised adapters.

The frozen base is never copied into a run: its path and a fingerprint (config.json and, per
weight file, name, size and a hash of its first and last MiB) are recorded, and adapters refuse a
base with another fingerprint (BaseMismatchError).

`model.builtin = "tiny-chatglm"` is a seeded, randomly initialised ChatGLM-6B-architecture model
(2 blocks, width 128) with the demo's character tokenizer: it needs no download, and its
fingerprint depends only on its config and seed.

    base = load_base(cfg.model, lora=None)                  # BaseModel: model, params, tokenizer
    plain = load_frozen_base("builtin:tiny-chatglm")        # the same from a recorded path
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
from flax import traverse_util

from cgc_lora_jax.layers import CGCLoRAConfig, init_adapters
from cgc_lora_jax.params import join_params, split_params
from cgc_lora_jax.sharding import first_device, match_partition_rules, named_shardings

BUILTIN_PREFIX = "builtin:"  # base "path" of a built-in base, e.g. builtin:tiny-chatglm
BUILTIN_SEED = 0
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MIB = 1 << 20
OBTAIN_CHATGLM = (
    "Download THUDM/chatglm-6b (or chatglm2-6b / chatglm3-6b) from the Hugging Face Hub on a machine "
    "with network access, e.g. `huggingface-cli download THUDM/chatglm-6b --local-dir checkpoints/chatglm-6b`, "
    "copy the folder (config.json, ice_text.model or tokenizer.model, pytorch_model*.bin or "
    "*.safetensors) here, and pass it as --config.model.path=FOLDER"
)


class BaseMismatchError(RuntimeError):
    """Adapters or a checkpoint trained on another base than the one at hand."""


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
    """The jnp dtype of a config's model.dtype; "auto" resolves on this machine (precision.resolve_dtype)."""
    from cgc_lora_jax.precision import resolve_dtype

    if name not in DTYPES and name != "auto":
        raise ValueError(f"model.dtype={name!r}: expected one of {sorted(DTYPES) + ['auto']}")
    return DTYPES[resolve_dtype(name)]


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
    else:
        params = jax.device_put(params, first_device())
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
