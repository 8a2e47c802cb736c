"""Trained adapters in a run folder (or an orbax export), saved, read and attached to a loaded base.

    WORKDIR/adapters/          trained adapters + meta.json          save_adapters / attach_adapters

    run = attach_adapters(base, "runs/demo")               # AdapterSet: the model with `lora`
    run = load_adapter_set("runs/demo")                    # the same on the base recorded at training
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from cgc_lora_jax.data.task_vocab import TaskVocab
from cgc_lora_jax.layers import CGCLoRAConfig
from cgc_lora_jax.params import is_adapter_path, join_params
from cgc_lora_jax.run.base import BaseMismatchError, BaseModel, load_frozen_base
from cgc_lora_jax.run.folder import VOCAB_FILE

ADAPTERS_DIR = "adapters"


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
