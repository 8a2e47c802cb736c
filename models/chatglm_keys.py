"""ChatGLM-6B checkpoints: the HF tensor names of every parameter, and how each is sharded.

    transformer.layers.{i}.attention.query_key_value.weight [out, in]
        <->  transformer/layers_{i}/attention/query_key_value/kernel [in, out]

and likewise attention.dense, mlp.dense_h_to_4h / dense_4h_to_h (all with .bias), the LayerNorms'
.weight / .bias (Flax scale / bias), transformer.word_embeddings.weight and lm_head.weight, which
is tied to the word embeddings. The model is models/chatglm.py.

    keys = key_map(ChatGLMConfig.from_hf(hf))
"""

from __future__ import annotations

from jax.sharding import PartitionSpec as P

from cgc_lora_jax.sharding import ADAPTER_RULES
from cgc_lora_jax.models.family_spec import KeyMap


def key_map(cfg) -> KeyMap:
    """HF tensor name -> (Flax path, transpose?): torch Linear [out, in] -> Flax kernel [in, out]."""
    top = ("transformer",)
    mapping = {
        "transformer.word_embeddings.weight": (top + ("word_embeddings", "embedding"), False),
        # Tied: the loader checks that lm_head equals the embedding and the saver writes both, so
        # a checkpoint with an untied head is refused instead of silently loading wrong.
        "lm_head.weight": (top + ("word_embeddings", "embedding"), False),
        "transformer.final_layernorm.weight": (top + ("final_layernorm", "scale"), False),
        "transformer.final_layernorm.bias": (top + ("final_layernorm", "bias"), False),
    }
    for i in range(cfg.num_layers):
        hf, flax_path = f"transformer.layers.{i}", top + (f"layers_{i}",)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            mapping[f"{hf}.{norm}.weight"] = (flax_path + (norm, "scale"), False)
            mapping[f"{hf}.{norm}.bias"] = (flax_path + (norm, "bias"), False)
        for parent, dense in (
            ("attention", "query_key_value"), ("attention", "dense"),
            ("mlp", "dense_h_to_4h"), ("mlp", "dense_4h_to_h"),
        ):
            mapping[f"{hf}.{parent}.{dense}.weight"] = (flax_path + (parent, dense, "kernel"), True)
            mapping[f"{hf}.{parent}.{dense}.bias"] = (flax_path + (parent, dense, "bias"), False)
    return mapping


# The paper's adapted layers: every dense layer of the blocks (attention qkv + output, both MLP layers).
PAPER_LORA_TARGETS = r"(query_key_value|dense|dense_h_to_4h|dense_4h_to_h)$"

PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"word_embeddings/embedding$", P("tensor", "fsdp")),  # vocab over tensor
    (r"(query_key_value|dense_h_to_4h)/kernel$", P("fsdp", "tensor")),  # column-parallel
    (r"(query_key_value|dense_h_to_4h)/bias$", P("tensor")),
    (r"(attention/dense|dense_4h_to_h)/kernel$", P("tensor", "fsdp")),  # row-parallel
    (r"(attention/dense|dense_4h_to_h)/bias$", P()),
    (r"layernorm/(scale|bias)$", P()),
    *ADAPTER_RULES,
    (r".*", P()),
)

# The model derives inv_freq itself.
IGNORED_KEYS = r"^transformer\.layers\.\d+\.attention\.rotary_emb\.inv_freq$"
