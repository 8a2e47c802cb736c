"""Load and save Hugging Face checkpoint folders (config.json + safetensors or .bin weights).

Loading fills the Flax parameter tree through the model family's explicit key map
(`ModelFamily.key_map`, HF name -> (Flax path, transpose?)):

    params[flax_path] = cast(tensor[hf_name].T if transpose else tensor[hf_name], param dtype)

one tensor at a time: a tensor is read, checked, cast, placed on its device and dropped before
the next is read, so host memory peaks at the loaded parameters plus about one tensor (plus, for
.bin, the pages of the current shard that torch's mmap touched). Expected shapes come from
`jax.eval_shape(model.init)`: no base parameter is ever initialised. The CGC-LoRA adapters are not
in checkpoints; they alone get a real init, and since every B starts at zero the loaded model
computes exactly the base model's outputs. Finding and reading the weights files is
models/weight_reader.py; writing them, models/weight_writer.py.

A tied copy is several HF names with one Flax path (ChatGLM-6B's `lm_head.weight` and its word
embeddings): the first fills the parameter, the others must equal it, and saving writes every
name. Tensors matching the family's `ignored_keys` are neither read nor written (the rotary
inv_freq buffers, which the PyTorch models compute at construction).

    model, params = load_pretrained("/ckpt/chatglm-6b", jnp.bfloat16, lora=CGCLoRAConfig(8))
    ...  # train the adapters, then fold one task in: merged = merge_task(params, 3, cfg)
    save_pretrained(model, merged, "/out/chatglm-6b-task3", dtype=jnp.bfloat16)
"""

from __future__ import annotations

import gc
import json
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cgc_lora_jax.layers import init_adapters
from cgc_lora_jax.params import is_adapter_path
from cgc_lora_jax.sharding import first_device, match_partition_rules, named_shardings
from cgc_lora_jax.models.family import ModelFamily, check_lora_targets, detect_family, with_default_targets
from cgc_lora_jax.models.gguf import find_gguf, read_gguf
from cgc_lora_jax.models.weight_reader import locate_tensors, open_weights
from cgc_lora_jax.models.weight_writer import TensorSpec, main_dtype_name, parse_size, write_folder

FlatParams = dict[tuple[str, ...], Any]

# config.json dicts of the configs load_pretrained built: id -> (config, dict), so that
# save_pretrained(model, ...) can write the original config.json back.
_HF_CONFIGS: dict[int, tuple[Any, dict]] = {}


def read_hf_config(folder: str | os.PathLike) -> dict:
    if (gguf_file := find_gguf(folder)) is not None:  # a .gguf file, or a folder holding one
        return read_gguf(gguf_file).hf_config
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} does not exist: a Hugging Face folder needs config.json")
    try:
        return json.loads(config_file.read_text())
    except ValueError as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from e


def family_config(family: ModelFamily, hf_config: dict, source: str) -> Any:
    """family.config_from_hf(hf_config), with errors (a missing field, ...) naming `source`."""
    try:
        return family.config_from_hf(hf_config)
    except Exception as e:  # noqa: BLE001 - any failure here means the config file is at fault
        raise ValueError(f"{source}: not a valid {family.name} config ({type(e).__name__}: {e})") from e


def abstract_params(model, with_adapters: bool) -> FlatParams:
    """{flax path: ShapeDtypeStruct} of the model's parameters, from eval_shape (no init)."""
    return traverse_util.flatten_dict(jax.eval_shape(_init_fn(model, with_adapters), jax.random.key(0)))


def _init_fn(model, with_adapters: bool):
    input_ids = jnp.zeros((1, 2), jnp.int32)
    task_ids = jnp.zeros((1,), jnp.int32) if with_adapters else None

    def init(rng):
        return model.init({"params": rng, "dropout": rng}, input_ids, task_ids=task_ids)["params"]

    return init


def _init_adapters(abstract: FlatParams, lora, seed: int, shardings: dict | None) -> FlatParams:
    """The adapters' initial values (layers.init_adapters: no model trace, no per-leaf compile),
    placed on their shardings."""
    adapters = init_adapters({p: leaf for p, leaf in abstract.items() if is_adapter_path(p)}, lora, seed)
    return {p: jax.device_put(v, first_device() if shardings is None else shardings[p]) for p, v in adapters.items()}


def _targets(family: ModelFamily, key_map, abstract: FlatParams) -> dict[tuple[str, ...], list[str]]:
    """{base flax path: [HF names]}, checking that the key map and the model agree."""
    targets: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for hf_key, (flax_path, _) in key_map.items():
        if tuple(flax_path) not in abstract:
            raise ValueError(
                f"model family {family.name!r}: key map sends {hf_key!r} to {'/'.join(flax_path)}, "
                "which the Flax model does not have"
            )
        targets[tuple(flax_path)].append(hf_key)
    unmapped = [p for p in abstract if not is_adapter_path(p) and p not in targets]
    if unmapped:
        raise ValueError(
            f"model family {family.name!r}: its key map gives no HF name for Flax parameters "
            f"{['/'.join(p) for p in unmapped[:5]]} ({len(unmapped)} in all)"
        )
    return targets


def _hf_shape(leaf, transpose: bool) -> tuple[int, ...]:
    return tuple(leaf.shape[::-1]) if transpose else tuple(leaf.shape)


def _is_ignored(pattern: str, hf_key: str) -> bool:
    return bool(pattern) and re.search(pattern, hf_key) is not None


def load_pretrained(
    path: str | os.PathLike,
    dtype: Any = jnp.float32,
    *,
    lora=None,
    remat: bool = False,
    family: ModelFamily | None = None,
    mesh: jax.sharding.Mesh | None = None,
    seed: int = 0,
) -> tuple[Any, dict]:
    """(model, params) from a local HF folder, a GGUF file or a folder holding one (models/gguf.py);
    model.apply({"params": params}, input_ids, ...).

    dtype: parameter and compute dtype. lora: a CGCLoRAConfig to add (freshly initialised, B = 0)
    adapters. family: skip detection from config.json. mesh: place each parameter with the
    family's partition rules as it is read. seed: the adapters' init.
    """
    folder = Path(path)
    config_file = find_gguf(folder) or folder / "config.json"
    hf_config = read_hf_config(folder)
    family = family or detect_family(hf_config, source=str(config_file))
    config = family_config(family, hf_config, str(config_file))
    lora = with_default_targets(family, lora)
    model = family.build(config, dtype=dtype, param_dtype=dtype, lora=lora, remat=remat)
    abstract = abstract_params(model, with_adapters=lora is not None)
    check_lora_targets(family, lora, abstract)
    key_map = family.key_map(config)
    targets = _targets(family, key_map, abstract)
    shardings = None
    if mesh is not None:
        specs = match_partition_rules(family.partition_rules, traverse_util.unflatten_dict(abstract))
        shardings = traverse_util.flatten_dict(named_shardings(mesh, specs))

    where = locate_tensors(folder)  # {hf name: weights file}
    ignored = family.ignored_keys
    unexpected = [(k, f) for k, f in where.items() if k not in key_map and not _is_ignored(ignored, k)]
    if unexpected:
        listed = "; ".join(f"{k!r} in {f}" for k, f in unexpected[:5])
        raise ValueError(
            f"unexpected keys, which the {family.name} key map does not use and its ignored_keys "
            f"{family.ignored_keys!r} do not match ({len(unexpected)} in all): {listed}"
        )
    missing = [(names[0], p) for p, names in targets.items() if not any(k in where for k in names)]
    if missing:
        listed = "; ".join(
            f"{k!r} (Flax {'/'.join(p)}, expected shape {_hf_shape(abstract[p], key_map[k][1])})"
            for k, p in missing[:5]
        )
        raise ValueError(
            f"missing keys: no weights file in {folder} holds {listed} ({len(missing)} in all)"
        )

    by_file: dict[Path, list[str]] = defaultdict(list)
    for hf_key, file in where.items():
        if hf_key in key_map:
            by_file[file].append(hf_key)
    flat: FlatParams = {}
    filled_by: dict[tuple[str, ...], str] = {}
    for file, hf_keys in by_file.items():
        with open_weights(file) as reader:
            for hf_key in reader.ordered(hf_keys):
                flax_path, transpose = key_map[hf_key]
                flax_path = tuple(flax_path)
                leaf = abstract[flax_path]
                array = reader.read(hf_key)
                if tuple(array.shape) != _hf_shape(leaf, transpose):
                    raise ValueError(
                        f"key {hf_key!r} in {file} has shape {tuple(array.shape)}, expected "
                        f"{_hf_shape(leaf, transpose)} (Flax {'/'.join(flax_path)} {tuple(leaf.shape)}"
                        f"{', transposed' if transpose else ''})"
                    )
                # On CPU, device_put adopts the reader's fresh aligned buffer without a copy; a
                # transpose is copied by XLA's blocked transpose (5x numpy's); the cast runs in XLA.
                sharding = first_device() if shardings is None else shardings[flax_path]
                value = jax.device_put(array.T if transpose else array, sharding)
                del array
                if value.dtype != leaf.dtype:
                    value = value.astype(leaf.dtype)
                if flax_path in flat:  # a tied name: it must repeat the tensor already loaded
                    if not bool(jnp.array_equal(flat[flax_path], value)):
                        raise ValueError(
                            f"key {hf_key!r} in {file} differs from {filled_by[flax_path]!r}, but the "
                            f"{family.name} model ties both to {'/'.join(flax_path)}"
                        )
                    continue
                flat[flax_path], filled_by[flax_path] = value, hf_key
                del value
        gc.collect()  # close the shard's mmap before the next one is touched
    if lora is not None:
        flat.update(_init_adapters(abstract, lora, seed, shardings))
    _HF_CONFIGS[id(config)] = (config, hf_config)
    return model, traverse_util.unflatten_dict(flat)


def _resolve_config(model_or_config, hf_config: dict | None) -> tuple[ModelFamily, Any, dict]:
    """(family, family config, config.json dict) from a model, a family config or a dict."""
    if isinstance(model_or_config, dict):
        hf_config = hf_config or model_or_config
        config = None
    else:
        config = getattr(model_or_config, "config", model_or_config)
        if hf_config is None:
            hf_config = getattr(config, "hf_config", None) or None  # families default it to {}
        if hf_config is None and id(config) in _HF_CONFIGS:
            hf_config = _HF_CONFIGS[id(config)][1]
        if hf_config is None:
            raise ValueError(
                "save_pretrained needs the model's config.json dict: pass a model or config from "
                "load_pretrained, the dict itself, or hf_config=..."
            )
    family = detect_family(hf_config, source="the config dict")
    if config is None:
        config = family_config(family, hf_config, "the config dict")
    return family, config, hf_config


def save_pretrained(
    model_or_config,
    params: dict,
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    max_shard_size: int | str = "5GB",
    hf_config: dict | None = None,
) -> Path:
    """Write `params` (no adapters) as an HF folder: config.json + model.safetensors (sharded,
    with model.safetensors.index.json, above `max_shard_size`), under the original HF names.

    model_or_config: a model or config from `load_pretrained`, or the config.json dict (or pass
    `hf_config`). dtype: of the written tensors (None: each parameter's own). The folder is
    written beside `path` and renamed into place; files of an existing folder that are not
    weights or config.json (tokenizer files, ...) are kept.
    """
    if set(params) == {"params"}:
        params = params["params"]
    flat = traverse_util.flatten_dict(params)
    adapters = [p for p in flat if is_adapter_path(p)]
    if adapters:
        raise ValueError(
            f"params still hold CGC-LoRA adapters (e.g. {'/'.join(adapters[0])}): fold a task into "
            "the base first with cgc_lora_jax.merge.merge_task(params, task, cfg), then save that"
        )
    family, config, hf_config = _resolve_config(model_or_config, hf_config)
    model = family.build(config, dtype=jnp.float32, param_dtype=jnp.float32, lora=None, remat=False)
    expected = abstract_params(model, with_adapters=False)
    for p in expected.keys() - flat.keys():
        raise ValueError(f"params lack {'/'.join(p)} of shape {expected[p].shape}, which the model has")
    for p in flat.keys() - expected.keys():
        raise ValueError(f"params hold {'/'.join(p)}, which the {family.name} model does not have")
    for p, leaf in expected.items():
        if tuple(np.shape(flat[p])) != tuple(leaf.shape):
            raise ValueError(f"params {'/'.join(p)} has shape {np.shape(flat[p])}, expected {leaf.shape}")

    key_map = family.key_map(config)
    _targets(family, key_map, expected)
    out_dtype = None if dtype is None else np.dtype(dtype)
    tensors = []
    for hf_key, (flax_path, transpose) in key_map.items():
        leaf = flat[tuple(flax_path)]
        tensor_dtype = out_dtype or np.dtype(leaf.dtype)

        def produce(leaf=leaf, transpose=transpose, tensor_dtype=tensor_dtype):
            value = jnp.asarray(leaf)  # transpose and cast in XLA: ~5x numpy's strided copy
            return np.asarray((value.T if transpose else value).astype(tensor_dtype))

        tensors.append(TensorSpec(hf_key, _hf_shape(leaf, transpose), tensor_dtype, produce))
    config_out = dict(hf_config)
    dtype_name = main_dtype_name(tensors)
    for field in ("torch_dtype", "dtype"):
        if field in config_out or (field == "torch_dtype" and "dtype" not in config_out):
            config_out[field] = dtype_name
    return write_folder(Path(path), tensors, config_out, parse_size(max_shard_size))
