"""Llama / Qwen2 checkpoints: the HF tensor names of every parameter, and how each is sharded.

    model.layers.{i}.self_attn.q_proj.weight [out, in]  <->  model/layers_{i}/self_attn/q_proj/kernel [in, out]

and likewise k/v/o_proj, mlp.{gate,up,down}_proj (with .bias where the config says so), the
norms' .weight, model.embed_tokens.weight, model.norm.weight and lm_head.weight (absent when the
embeddings are tied). The model is models/llama.py.

    keys = key_map(LlamaConfig.from_hf(hf))   # {"model.norm.weight": (("model", "norm", "weight"), False), ...}
"""

from __future__ import annotations

from jax.sharding import PartitionSpec as P

from cgc_lora_jax.sharding import ADAPTER_RULES
from cgc_lora_jax.models.family_spec import KeyMap


def key_map(config) -> KeyMap:
    """HF tensor name -> (Flax path, transpose?); torch Linear [out, in] -> Flax kernel [in, out]."""
    keys: KeyMap = {
        "model.embed_tokens.weight": (("model", "embed_tokens", "embedding"), False),
        "model.norm.weight": (("model", "norm", "weight"), False),
    }
    projections = (
        ("self_attn", "q_proj", config.qkv_bias),
        ("self_attn", "k_proj", config.qkv_bias),
        ("self_attn", "v_proj", config.qkv_bias),
        ("self_attn", "o_proj", config.o_bias),
        ("mlp", "gate_proj", config.mlp_bias),
        ("mlp", "up_proj", config.mlp_bias),
        ("mlp", "down_proj", config.mlp_bias),
    )
    for i in range(config.num_hidden_layers):
        hf, fx = f"model.layers.{i}.", ("model", f"layers_{i}")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            keys[f"{hf}{norm}.weight"] = (fx + (norm, "weight"), False)
        for parent, proj, has_bias in projections:
            keys[f"{hf}{parent}.{proj}.weight"] = (fx + (parent, proj, "kernel"), True)
            if has_bias:
                keys[f"{hf}{parent}.{proj}.bias"] = (fx + (parent, proj, "bias"), False)
    if not config.tie_word_embeddings:
        keys["lm_head.weight"] = (("lm_head", "kernel"), True)
    return keys


# Megatron layout: q/k/v/gate/up split their outputs over "tensor" (column-parallel), o/down their
# inputs (row-parallel), so each block needs one all-reduce per sublayer; "fsdp" shards the other
# kernel axis. Embeddings and norms stay replicated.
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$", P("fsdp", "tensor")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/bias$", P("tensor")),
    (r"(o_proj|down_proj)/kernel$", P("tensor", "fsdp")),
    (r"(o_proj|down_proj)/bias$", P()),
    (r"^lm_head/kernel$", P("fsdp", "tensor")),
    (r"embed_tokens/embedding$", P()),
    (r"(layernorm|norm)/weight$", P()),
    *ADAPTER_RULES,
    (r".*", P()),
)

IGNORED_KEYS = r"rotary_emb\.inv_freq$"  # older checkpoints store the derived RoPE buffer
# Every linear layer of the blocks (levanter's default), not the vocabulary head.
DEFAULT_LORA_TARGETS = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
