"""The frozen base model of a run: a local Hugging Face folder, a GGUF file (or a folder holding
one), a named base `hub:NAME` fetched into the cache (cgc_lora_jax/hub.py), or a built-in tiny model.

    base = load_base(cfg.model, lora=lora_cfg, mesh=mesh, workdir=workdir)
    base.model, base.params, base.tokenizer, base.family, base.info  # info: path + fingerprint

`model.builtin = "tiny-chatglm"` is a seeded, randomly initialised ChatGLM-6B-architecture model
(2 blocks, width 128) with the demo's character tokenizer: it needs no download, and its
fingerprint depends only on its config and seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from cgc_lora_jax.checkpoint import fingerprint_base
from cgc_lora_jax.layers import CGCLoRAConfig
from cgc_lora_jax.params import join_params, split_params
from cgc_lora_jax.sharding import match_partition_rules, named_shardings

BUILTIN_SEED = 0
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
OBTAIN_CHATGLM = (
    "Download THUDM/chatglm-6b (or chatglm2-6b / chatglm3-6b) from the Hugging Face Hub on a machine "
    "with network access, e.g. `huggingface-cli download THUDM/chatglm-6b --local-dir checkpoints/chatglm-6b`, "
    "copy the folder (config.json, ice_text.model or tokenizer.model, pytorch_model*.bin or "
    "*.safetensors) here, and pass it as --config.model.path=FOLDER"
)


@dataclasses.dataclass
class BaseModel:
    family: str  # model family name, e.g. "chatglm"
    model: Any  # the Flax module (with adapters when `lora` was given)
    params: dict  # base parameters, plus freshly initialised adapters when `lora` was given
    tokenizer: Any
    info: dict  # {"path": ..., "fingerprint": ...}: recorded in checkpoints, checked on resume


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


def _load_builtin(model_cfg, lora, mesh, workdir, seed) -> BaseModel:
    from cgc_lora_jax.demo_tokenizer import DemoTokenizer
    from models import chatglm
    from models.family import check_lora_targets, with_default_targets

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
    init = jax.jit(lambda key: model.init(key, ids, None, task_ids)["params"])
    params = init(jax.random.key(BUILTIN_SEED))
    check_lora_targets(chatglm.FAMILY, lora, traverse_util.flatten_dict(params))
    if lora is not None:  # the base from BUILTIN_SEED, the adapters from the run's seed
        base, _ = split_params(params)
        params = join_params(base, split_params(init(jax.random.key(seed)))[1])
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
    from cgc_lora_jax.formatting import load_tokenizer
    from cgc_lora_jax.hub import resolve_model_path
    from models.family import detect_family
    from models.gguf import find_gguf
    from models.hf_io import load_pretrained, read_hf_config

    path = resolve_model_path(model_cfg.path)  # hub:NAME is fetched into the cache on first use
    if find_gguf(path) is None and not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.path={str(path)!r} holds no config.json or .gguf file. {OBTAIN_CHATGLM}")
    family = detect_family(read_hf_config(path), source=str(find_gguf(path) or path / "config.json"))
    model, params = load_pretrained(path, _dtype(model_cfg.dtype), lora=lora, remat=model_cfg.remat, mesh=mesh, seed=seed)
    tokenizer = load_tokenizer(family.name, path) if with_tokenizer else None
    return BaseModel(family.name, model, params, tokenizer, {"path": str(path.resolve()), "fingerprint": fingerprint_base(path)})
