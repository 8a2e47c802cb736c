"""ChatGLM2-6B / ChatGLM3-6B checkpoints: the HF tensor names of every parameter, and how each is sharded.

    transformer.encoder.layers.{i}.self_attention.query_key_value.weight [out, in]
        <->  transformer/encoder/layers_{i}/self_attention/query_key_value/kernel [in, out]

and likewise self_attention.dense, mlp.dense_h_to_4h / dense_4h_to_h (with .bias where the config
says so), the RMSNorms' .weight (Flax `scale`), transformer.embedding.word_embeddings.weight,
transformer.encoder.final_layernorm.weight and transformer.output_layer.weight. The model is
models/chatglm2.py.

    keys = key_map(ChatGLM2Config.from_hf(hf))
"""

from __future__ import annotations

from jax.sharding import PartitionSpec as P

from cgc_lora_jax.sharding import ADAPTER_RULES
from cgc_lora_jax.models.family_spec import KeyMap


def key_map(config) -> KeyMap:
    """Every stored tensor -> (Flax path, transpose?); torch Linear [out, in] -> kernel [in, out]."""
    top = ("transformer",)
    keys: KeyMap = {
        "transformer.embedding.word_embeddings.weight": (
            top + ("embedding", "word_embeddings", "embedding"),
            False,
        )
    }
    linears = (
        ("self_attention.query_key_value", config.qkv_bias),
        ("self_attention.dense", config.add_bias_linear),
        ("mlp.dense_h_to_4h", config.add_bias_linear),
        ("mlp.dense_4h_to_h", config.add_bias_linear),
    )
    for i in range(config.num_layers):
        hf, fx = f"transformer.encoder.layers.{i}.", top + ("encoder", f"layers_{i}")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            keys[f"{hf}{norm}.weight"] = (fx + (norm, "scale"), False)
        for name, has_bias in linears:
            keys[f"{hf}{name}.weight"] = (fx + (*name.split("."), "kernel"), True)
            if has_bias:
                keys[f"{hf}{name}.bias"] = (fx + (*name.split("."), "bias"), False)
    if config.post_layer_norm:
        final = top + ("encoder", "final_layernorm", "scale")
        keys["transformer.encoder.final_layernorm.weight"] = (final, False)
    keys["transformer.output_layer.weight"] = (top + ("output_layer", "kernel"), True)
    return keys


# The paper's adapted layers: every dense layer of the blocks. The same layer names as ChatGLM-6B,
# so the paper's targets carry over.
PAPER_LORA_TARGETS = r"(query_key_value|dense|dense_h_to_4h|dense_4h_to_h)$"

# The model derives the rotary frequencies itself.
IGNORED_KEYS = r"^transformer\.rotary_pos_emb\.inv_freq$"

# Megatron layout: column-parallel qkv / dense_h_to_4h (output features over "tensor"), row-parallel
# dense / dense_4h_to_h (input features over "tensor"); the other kernel axis over "fsdp".
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"embedding/word_embeddings/embedding$", P("tensor", "fsdp")),
    (r"(query_key_value|dense_h_to_4h)/kernel$", P("fsdp", "tensor")),
    (r"(query_key_value|dense_h_to_4h)/bias$", P("tensor")),
    (r"(self_attention/dense|dense_4h_to_h)/kernel$", P("tensor", "fsdp")),
    (r"(self_attention/dense|dense_4h_to_h)/bias$", P()),
    (r"layernorm/scale$", P()),
    (r"output_layer/kernel$", P("fsdp", "tensor")),
    *ADAPTER_RULES,
    (r".*", P()),
)
