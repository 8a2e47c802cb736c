"""ChatGLM2-6B / ChatGLM3-6B (one network, one checkpoint layout) in Flax linen, CGC-LoRA ready.

Per block (pre-norm; x [B, T, d]):

    h = x + dense(Attention(RMSNorm(x)))
    y = h + dense_4h_to_h(silu(a) * b),          [a | b] = dense_h_to_4h(RMSNorm(h))
    RMSNorm(x) = w * x / sqrt(mean(x^2) + eps)    (float32 arithmetic)

Attention: [q | k | v] = query_key_value(x) (the one layer with a bias unless add_bias_linear);
q has H heads, k and v have G groups, all of kv_channels = D dims; query head h reads group
h // (H / G). Rotary embedding turns the first D/2 dims of q and k, in interleaved pairs
(x[2i], x[2i+1]), by the angle pos * theta_i, theta_i = 1 / (10000 * rope_ratio) ** (2i / (D/2)),
in float32. Then softmax(q k^T / sqrt(D) + mask) v with a float32 softmax, and
logits = output_layer(RMSNorm(h_L)).

Masks and positions come from the [B, T] left-padding mask alone: positions are 0 on pads and
0..n-1 on the n tokens; a token sees the earlier tokens and never a pad; a pad query sees every
key (as in the original; its output is never used). No mask: plain causal, positions arange(T).

    cfg = ChatGLM2Config.from_hf(json.load(open("config.json")))
    model = ChatGLM2ForCausalLM(cfg, lora=CGCLoRAConfig(num_tasks=4, targets="query_key_value"))
    logits = model.apply({"params": params}, input_ids, attention_mask, task_ids)
    cache = model.init_cache(batch_size, max_length)
    logits, cache = model.apply({"params": params}, prompt_ids, prompt_mask, task_ids,
                                cache=cache, method=model.decode)   # then one token per call
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec as P

from cgc_lora_jax.layers import AdapterInputs, CGCLoRAConfig, Dense, TaskRouting
from cgc_lora_jax.sharding import ADAPTER_RULES
from cgc_lora_jax.models.family import KeyMap, ModelFamily, register

Array = jax.Array
_REQUIRED = (
    "hidden_size", "num_layers", "num_attention_heads", "kv_channels", "ffn_hidden_size",
    "multi_query_attention", "multi_query_group_num", "padded_vocab_size", "layernorm_epsilon",
    "seq_length", "add_qkv_bias", "add_bias_linear", "rmsnorm", "post_layer_norm",
    "apply_residual_connection_post_layernorm", "eos_token_id", "pad_token_id",
)  # fmt: skip
# config.json setting -> (the value this port implements, its default when absent)
_FIXED = {
    "rmsnorm": (True, None),
    "multi_query_attention": (True, None),
    "apply_residual_connection_post_layernorm": (False, None),
    "fp32_residual_connection": (False, False),
    "tie_word_embeddings": (False, False),
}
_UNSET = ("pre_seq_len", "quantization_bit")  # p-tuning prefix and int quantization: not ported


@dataclasses.dataclass(frozen=True)
class ChatGLM2Config:
    """The config.json fields the network uses (names as in config.json)."""

    hidden_size: int  # d: width of the residual stream
    num_layers: int  # number of GLM blocks
    num_attention_heads: int  # H: query heads
    kv_channels: int  # D: width of one head (q, k and v)
    ffn_hidden_size: int  # width of silu(a) * b in the MLP
    multi_query_group_num: int  # G: key/value heads, each serving H / G consecutive query heads
    padded_vocab_size: int  # rows of word_embeddings and columns of output_layer
    layernorm_epsilon: float  # eps of every RMSNorm
    seq_length: int  # context length the model was trained for, in tokens
    add_qkv_bias: bool  # bias on query_key_value
    add_bias_linear: bool  # bias on dense, dense_h_to_4h and dense_4h_to_h (and qkv)
    post_layer_norm: bool  # final RMSNorm (final_layernorm) before output_layer
    eos_token_id: int | tuple[int, ...]  # end-of-sequence id(s)
    pad_token_id: int  # id the tokenizer left-pads with
    rope_ratio: float = 1.0  # rotary base is 10000 * rope_ratio (ChatGLM3-6B-32k: 50)
    hidden_dropout: float = 0.0  # dropout rate on each sublayer output (training only)
    attention_dropout: float = 0.0  # dropout rate on the attention probabilities (training only)
    hf_config: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        h, g, d = self.num_attention_heads, self.multi_query_group_num, self.kv_channels
        if g < 1 or h % g:
            raise ValueError(f"num_attention_heads={h} is no multiple of multi_query_group_num={g}")
        if d % 4:
            raise ValueError(f"kv_channels={d}: rotary pairs on half a head need a multiple of 4")

    @property
    def qkv_bias(self) -> bool:
        return self.add_qkv_bias or self.add_bias_linear

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> ChatGLM2Config:
        missing = [name for name in _REQUIRED if name not in hf]
        if missing:
            raise ValueError(f"{source}: ChatGLM2/3 needs field(s) {missing}, which are missing")
        for name, (wanted, default) in _FIXED.items():
            if hf.get(name, default) != wanted:
                raise ValueError(
                    f"{source}: {name}={hf.get(name, default)!r} is not supported by "
                    f"models/chatglm2.py (it implements {name}={wanted!r} only)"
                )
        for name in _UNSET:
            if hf.get(name):
                raise ValueError(f"{source}: {name}={hf[name]!r} is not supported by this port")
        eos = hf["eos_token_id"]
        fields = {f.name for f in dataclasses.fields(cls)} - {"hf_config", "eos_token_id"}
        return cls(
            **{k: hf[k] for k in fields if k in hf},
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            hf_config=dict(hf),
        )


@struct.dataclass
class KVCache:
    """Decoding state with static shapes: S = max_length slots, written left to right."""

    keys: tuple[Array, ...]  # per layer [B, S, G, D], rotary already applied
    values: tuple[Array, ...]  # per layer [B, S, G, D]
    valid: Array  # [B, S] bool: the slot holds a token (False for pads and unwritten slots)
    index: Array  # [] int32: next slot to write (the same for every row)
    next_position: Array  # [B] int32: rotary position of each row's next token


def position_ids(attention_mask: Array, start: Array | int = 0) -> Array:
    """Left-padding positions [B, T]: 0 on pads, start, start+1, ... on the tokens."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.where(mask > 0, jnp.asarray(start)[..., None] + jnp.cumsum(mask, axis=1) - 1, 0)


def prompt_attention(mask_bt: Array) -> Array:
    """allowed[b, i, j] = (j <= i and token j is real) or query i is a pad (original get_masks)."""
    t = mask_bt.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    return (causal[None] & mask_bt[:, None, :]) | ~mask_bt[:, :, None]


def cached_attention(mask_bt: Array, valid_bs: Array, index: Array) -> Array:
    """allowed[b, i, s] for the T queries written at slots index..index+T-1 of S.

    A token sees the real tokens in slots <= its own; a pad query sees every written slot.
    """
    t, slot = mask_bt.shape[1], jnp.arange(valid_bs.shape[1])
    causal = slot[None, :] <= (index + jnp.arange(t))[:, None]  # [T, S]
    written = slot < index + t  # [S]
    return (causal[None] & valid_bs[:, None, :]) | (~mask_bt[:, :, None] & written)


def rotary_cos_sin(positions: Array, rot_dim: int, rope_ratio: float) -> tuple[Array, Array]:
    """cos, sin [B, T, rot_dim/2] of pos * theta_i; theta_i = (10000 rope_ratio)^(-2i/rot_dim)."""
    exponents = jnp.arange(0, rot_dim, 2, dtype=jnp.float32) / rot_dim
    theta = 1.0 / (10000.0 * rope_ratio) ** exponents
    angles = positions.astype(jnp.float32)[..., None] * theta
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x_bthd: Array, cos: Array, sin: Array) -> Array:
    """Rotate pairs (x[2i], x[2i+1]) of the first 2 * cos.shape[-1] dims; the rest pass through."""
    lead, rot = x_bthd.shape[:-1], 2 * cos.shape[-1]
    pairs = x_bthd[..., :rot].astype(jnp.float32).reshape(*lead, rot // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    turned = jnp.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1).reshape(*lead, rot)
    return jnp.concatenate([turned.astype(x_bthd.dtype), x_bthd[..., rot:]], axis=-1)


def grouped_attention(q_bthd, k_bsgd, v_bsgd, allowed_bts, probs_dropout=lambda p: p) -> Array:
    """softmax(q k^T / sqrt(D), masked where not allowed) v; query head h reads group h // (H/G)."""
    b, t, h, d = q_bthd.shape
    g = k_bsgd.shape[2]
    q = q_bthd.reshape(b, t, g, h // g, d)
    scores = jnp.einsum("btgrd,bsgd->bgrts", q, k_bsgd, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(d))
    # A finite fill: a fully masked row (never built here) would give uniform weights, not NaN.
    scores = jnp.where(allowed_bts[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = probs_dropout(jax.nn.softmax(scores, axis=-1).astype(v_bsgd.dtype))
    out = jnp.einsum("bgrts,bsgd->btgrd", probs, v_bsgd, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d)


class RMSNorm(nn.Module):
    """w * x / sqrt(mean(x^2) + eps) in float32; the output has x's dtype."""

    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (scale.astype(jnp.float32) * normed).astype(x.dtype)


class SelfAttention(nn.Module):
    """Multi-query attention; with a layer cache (keys, values, index) it writes at `index`."""

    config: ChatGLM2Config
    lora: CGCLoRAConfig | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.nowrap
    def dense(self, features: int, use_bias: bool, name: str) -> Dense:
        return Dense(features, use_bias, self.lora, self.dtype, self.param_dtype, name=name)

    @nn.compact
    def __call__(self, x, rope, allowed, adapters, deterministic, layer_cache):
        cfg = self.config
        h, g, d = cfg.num_attention_heads, cfg.multi_query_group_num, cfg.kv_channels
        b, t = x.shape[:2]
        qkv_layer = self.dense(h * d + 2 * g * d, cfg.qkv_bias, "query_key_value")
        qkv = qkv_layer(x, adapters, deterministic)
        q, k, v = jnp.split(qkv, [h * d, h * d + g * d], axis=-1)
        q = apply_rotary(q.reshape(b, t, h, d), *rope)
        k = apply_rotary(k.reshape(b, t, g, d), *rope)
        v = v.reshape(b, t, g, d)
        if layer_cache is not None:
            keys, values, index = layer_cache
            keys = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), (0, index, 0, 0))
            values = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), (0, index, 0, 0))
            layer_cache = (keys, values)
            k, v = keys.astype(self.dtype), values.astype(self.dtype)
        drop = nn.Dropout(cfg.attention_dropout, name="attention_dropout")
        context = grouped_attention(q, k, v, allowed, lambda p: drop(p, deterministic))
        context = context.reshape(b, t, h * d).astype(self.dtype)
        dense = self.dense(cfg.hidden_size, cfg.add_bias_linear, "dense")
        return dense(context, adapters, deterministic), layer_cache


class MLP(nn.Module):
    """dense_4h_to_h(silu(a) * b) with [a | b] = dense_h_to_4h(x)."""

    config: ChatGLM2Config
    lora: CGCLoRAConfig | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, adapters, deterministic):
        cfg = self.config
        dense = lambda features, name: Dense(  # noqa: E731
            features, cfg.add_bias_linear, self.lora, self.dtype, self.param_dtype, name=name
        )
        ab = dense(2 * cfg.ffn_hidden_size, "dense_h_to_4h")(x, adapters, deterministic)
        a, b = jnp.split(ab, 2, axis=-1)
        return dense(cfg.hidden_size, "dense_4h_to_h")(nn.silu(a) * b, adapters, deterministic)


class GLMBlock(nn.Module):
    """x + Attention(RMSNorm(x)), then + MLP(RMSNorm(.)); returns (hidden, updated layer cache)."""

    config: ChatGLM2Config
    lora: CGCLoRAConfig | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, rope, allowed, adapters, layer_cache, deterministic):
        cfg, kw = self.config, dict(lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype)
        eps = cfg.layernorm_epsilon
        norm = lambda name: RMSNorm(eps, self.param_dtype, name=name)  # noqa: E731
        drop = nn.Dropout(cfg.hidden_dropout)
        attn, layer_cache = SelfAttention(cfg, name="self_attention", **kw)(
            norm("input_layernorm")(hidden), rope, allowed, adapters, deterministic, layer_cache
        )
        hidden = hidden + drop(attn, deterministic=deterministic)
        normed = norm("post_attention_layernorm")(hidden)
        mlp = MLP(cfg, name="mlp", **kw)(normed, adapters, deterministic)
        return hidden + drop(mlp, deterministic=deterministic), layer_cache


class Embedding(nn.Module):
    """Token embedding, its own module so the path reads transformer/embedding/word_embeddings."""

    config: ChatGLM2Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: Array) -> Array:
        cfg = self.config
        return nn.Embed(
            cfg.padded_vocab_size,
            cfg.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.initializers.normal(0.02),
            name="word_embeddings",
        )(input_ids)


class GLMTransformer(nn.Module):
    """The blocks and the final RMSNorm; `remat` recomputes each block in the backward pass."""

    config: ChatGLM2Config
    lora: CGCLoRAConfig | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, hidden, rope, allowed, adapters, layer_caches, deterministic):
        cfg = self.config
        # static_argnums counts self as 0: `deterministic` (a Python bool) is argument 6.
        block = nn.remat(GLMBlock, static_argnums=(6,)) if self.remat else GLMBlock
        new_caches = []
        for i in range(cfg.num_layers):
            layer_cache = None if layer_caches is None else layer_caches[i]
            hidden, layer_cache = block(
                cfg, self.lora, self.dtype, self.param_dtype, name=f"layers_{i}"
            )(hidden, rope, allowed, adapters, layer_cache, deterministic)
            new_caches.append(layer_cache)
        if cfg.post_layer_norm:
            final_norm = RMSNorm(cfg.layernorm_epsilon, self.param_dtype, name="final_layernorm")
            hidden = final_norm(hidden)
        return hidden, new_caches


class ChatGLM2Model(nn.Module):
    """embedding -> encoder -> output_layer, under the checkpoint's "transformer" prefix."""

    config: ChatGLM2Config
    lora: CGCLoRAConfig | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, positions, allowed, adapters, layer_caches, deterministic):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        hidden = Embedding(cfg, name="embedding", **kw)(input_ids)
        rope = rotary_cos_sin(positions, cfg.kv_channels // 2, cfg.rope_ratio)
        encoder = GLMTransformer(cfg, self.lora, remat=self.remat, name="encoder", **kw)
        hidden, layer_caches = encoder(hidden, rope, allowed, adapters, layer_caches, deterministic)
        output_layer = Dense(cfg.padded_vocab_size, False, self.lora, name="output_layer", **kw)
        return output_layer(hidden, adapters, deterministic).astype(jnp.float32), layer_caches


class ChatGLM2ForCausalLM(nn.Module):
    """The model of the module docstring; parameters under "transformer" (and "task_gate")."""

    config: ChatGLM2Config
    lora: CGCLoRAConfig | None = None
    dtype: Any = jnp.float32  # activation dtype (norms, rotary and softmax stay float32)
    param_dtype: Any = jnp.float32
    remat: bool = False  # recompute each block in the backward pass

    def __call__(self, input_ids, attention_mask=None, task_ids=None, deterministic=True) -> Array:
        mask = _token_mask(input_ids, attention_mask)
        logits, _ = self._forward(
            input_ids, position_ids(mask), prompt_attention(mask), task_ids, None, deterministic
        )
        return logits

    def decode(self, input_ids, attention_mask=None, task_ids=None, *, cache: KVCache):
        """T new tokens per row against the cache -> (logits [B, T, V], updated cache).

        Writes past the cache's max_length are dropped silently: size `init_cache` for the
        prompt plus every new token.
        """
        mask = _token_mask(input_ids, attention_mask)
        valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, cache.index))
        layer_caches = [(k, v, cache.index) for k, v in zip(cache.keys, cache.values)]
        logits, layer_caches = self._forward(
            input_ids,
            position_ids(mask, cache.next_position),
            cached_attention(mask, valid, cache.index),
            task_ids,
            layer_caches,
            True,
        )
        cache = KVCache(
            keys=tuple(k for k, _ in layer_caches),
            values=tuple(v for _, v in layer_caches),
            valid=valid,
            index=cache.index + input_ids.shape[1],
            next_position=cache.next_position + jnp.sum(mask, axis=1, dtype=jnp.int32),
        )
        return logits, cache

    @nn.nowrap
    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        dtype = dtype or self.dtype or jnp.float32  # the cache holds K/V in the compute dtype
        cfg = self.config
        shape = (batch_size, max_length, cfg.multi_query_group_num, cfg.kv_channels)
        return KVCache(
            keys=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            values=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            valid=jnp.zeros((batch_size, max_length), bool),
            index=jnp.zeros((), jnp.int32),
            next_position=jnp.zeros((batch_size,), jnp.int32),
        )

    @nn.compact
    def _forward(self, input_ids, positions, allowed, task_ids, layer_caches, deterministic):
        adapters: AdapterInputs | None = None
        if self.lora is not None:
            gate = TaskRouting(self.lora, name="task_gate")
            adapters = gate(task_ids, input_ids.shape[0])
        transformer = ChatGLM2Model(
            self.config, self.lora, self.dtype, self.param_dtype, self.remat, name="transformer"
        )
        return transformer(input_ids, positions, allowed, adapters, layer_caches, deterministic)


def _token_mask(input_ids: Array, attention_mask: Array | None) -> Array:
    if attention_mask is None:
        return jnp.ones(input_ids.shape, bool)
    return attention_mask.astype(bool)


def build(
    config: ChatGLM2Config, *, dtype=jnp.float32, param_dtype=jnp.float32, lora=None, remat=False
) -> ChatGLM2ForCausalLM:
    return ChatGLM2ForCausalLM(config, lora=lora, dtype=dtype, param_dtype=param_dtype, remat=remat)


def key_map(config: ChatGLM2Config) -> KeyMap:
    """Every stored tensor -> (Flax path, transpose?); torch Linear [out, in] -> kernel [in, out]"""
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


# Megatron layout: column-parallel qkv / dense_h_to_4h (output features over "tensor"), row-parallel
# dense / dense_4h_to_h (input features over "tensor"); the other kernel axis over "fsdp".
# The same layer names as ChatGLM-6B, so the paper's targets carry over.
PAPER_LORA_TARGETS = r"(query_key_value|dense|dense_h_to_4h|dense_4h_to_h)$"

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


def matches(hf_config: dict) -> bool:
    """ChatGLM2-6B and ChatGLM3-6B: model_type "chatglm" with the v2 fields (v1 has neither)."""
    return hf_config.get("model_type") == "chatglm" and (
        "multi_query_attention" in hf_config or "padded_vocab_size" in hf_config
    )


FAMILY = register(
    ModelFamily(
        name="chatglm2",
        matches=matches,
        config_from_hf=ChatGLM2Config.from_hf,
        build=build,
        key_map=key_map,
        ignored_keys=r"^transformer\.rotary_pos_emb\.inv_freq$",
        partition_rules=PARTITION_RULES,
        default_lora_targets=PAPER_LORA_TARGETS,
    )
)
