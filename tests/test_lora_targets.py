"""Default LoRA targets per family (models/family.py): lora.targets="" adapts every linear layer
of the Llama/Qwen2 blocks and the paper's layers of ChatGLM; targets that match nothing are an
error listing the layer paths."""

import re

import jax.numpy as jnp
import ml_collections
import pytest
from flax import traverse_util

from cgc_lora_jax.layers import CGCLoRAConfig
from cgc_lora_jax.models.hf_io import load_pretrained
from tests.tiny_gguf import SIZES, Q, write_tiny_gguf


def adapted_layers(params) -> set[str]:
    """Layer paths holding experts, block indices folded to N."""
    flat = traverse_util.flatten_dict(params)
    return {re.sub(r"layers_\d+", "layers_N", "/".join(p[: p.index("lora")])) for p in flat if "lora" in p}


def test_llama_default_is_every_block_linear_not_the_head(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", "llama", Q.F32, tied=False)  # has an lm_head Dense
    _, params = load_pretrained(tmp_path, jnp.float32, lora=CGCLoRAConfig(num_tasks=2, targets=""))
    expected = {f"model/layers_N/{m}" for m in ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj",
                                                "self_attn/o_proj", "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")}
    assert adapted_layers(params) == expected
    adapted_blocks = {p[1] for p in traverse_util.flatten_dict(params) if "lora" in p}
    assert adapted_blocks == {f"layers_{i}" for i in range(SIZES["layers"])}


def test_chatglm_default_is_the_papers():
    from cgc_lora_jax.run import load_base

    cfg = ml_collections.ConfigDict(dict(path="", builtin="tiny-chatglm", dtype="float32", remat=False))
    base = load_base(cfg, lora=CGCLoRAConfig(num_tasks=2, targets=""))
    names = {path.rsplit("/", 1)[-1] for path in adapted_layers(base.params)}
    assert names == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}


def test_targets_matching_nothing_list_the_layer_paths(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", "qwen2", Q.F32, tied=False)
    with pytest.raises(ValueError) as error:
        load_pretrained(tmp_path, lora=CGCLoRAConfig(num_tasks=2, targets="query_key_value"))
    text = str(error.value)
    assert "lora.targets='query_key_value' matches no layer of the qwen2 model" in text
    assert "model/layers_N/self_attn/q_proj" in text and "model/layers_N/mlp/down_proj" in text
    assert "lm_head" in text  # untied: a layer the regex could match


def test_the_config_default_is_the_familys():
    from cgc_lora_jax.config import load_config

    assert load_config("promptcblue").lora.targets == ""
