"""The pieces every model family is built from: RMSNorm, rotary embeddings, grouped-query
attention over a KV cache, left-padding positions, and the fields and task gate of a family's
modules. Each family keeps its own parity with its original through the parameters below.

    RMSNorm(x)  = w * x / sqrt(mean(x^2) + eps), normalised in float32; the cast back comes before
                  the scale (Llama: w * cast(n)) or after it (ChatGLM2: cast(w32 * n))
    RoPE(x, p)  = x cos(p f) + rotate(x) sin(p f),  f_i = 1 / base^(2i/D),  i < D/2
                  rotate pairs (x_i, x_{i+D/2}) -> (-x_{i+D/2}, x_i)   (rotate-half: Llama, ChatGLM-6B)
                  or (x_{2i}, x_{2i+1}) -> (-x_{2i+1}, x_{2i})          (interleaved: ChatGLM2)
    Attn        = softmax(scale q k^T, masked) v with float32 scores and softmax; K/V have G heads,
                  each serving H/G consecutive query heads (G = H: plain multi-head attention)
    positions   = start + cumsum(mask) - 1 on tokens, 0 on pads

The KV cache, one structure for every family (a dict of arrays with static shapes, so a jitted
decode step never recompiles, and serve/slots.py finds its batch and sequence axes by shape):

    {"index":  [] int32     next slot to write, the same for every row (or the Python int 0: a
                            cache known empty while tracing, so the prompt attends over its own
                            keys alone; generate's prefill passes it, see cached_attention),
     "valid":  [B, S] bool  the slot holds a real token (False: a pad or not written yet),
     "layers": ({"key": [B, G, S, D], "value": [B, G, S, D]}, ...)   keys after RoPE,
     **positions            the family's per-row position state, [B] int32 each}

The cache holds K/V heads-major, the layout both attention matmuls read without a transpose, so a
decode step never copies the cache; a chunk of T tokens goes to slots [index, index + T). Without
a cache, attention reads the chunk's K/V as the projections give them, [B, T, G, D].

    cos, sin = rope_cos_sin(positions_bt, rope_inv_freq(64, 10000.0), jnp.float32)
    out, layer_cache = cached_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v,
                                        mask_bts, layer_cache, cache["index"])
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cgc_lora_jax.layers import AdapterInputs, CGCLoRAConfig, Dense, TaskRouting
from cgc_lora_jax.precision import accum_einsum

Array = jax.Array


class RMSNorm(nn.Module):
    """w * x / sqrt(mean(x^2) + eps) in float32; `cast_before_scale` picks the original's order."""

    eps: float
    dtype: Any = None  # output dtype (None: x's)
    param_dtype: Any = jnp.float32
    weight_name: str = "weight"  # the parameter's name: the checkpoint's ("weight", or "scale")
    cast_before_scale: bool = True  # True: w * cast(n) in dtype; False: cast(float32(w) * n)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        weight = self.param(self.weight_name, nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        dtype = self.dtype or x.dtype
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.cast_before_scale:
            return weight.astype(dtype) * normed.astype(dtype)
        return (weight.astype(jnp.float32) * normed).astype(dtype)


def rope_inv_freq(dim: int, base: float) -> np.ndarray:
    """f_i = 1 / base^(2i/dim) for i < dim/2, float32, computed on the host (numpy)."""
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return (np.float32(1.0) / np.float32(base) ** exponents).astype(np.float32)


def rope_cos_sin(positions_bt: Array, inv_freq: np.ndarray, dtype) -> tuple[Array, Array]:
    """cos, sin [B, T, 1, D/2] of the angles pos * inv_freq (float32), cast to `dtype`."""
    angles = positions_bt.astype(jnp.float32)[..., None, None] * jnp.asarray(inv_freq)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x_bthd: Array, cos: Array, sin: Array, interleaved: bool = False) -> Array:
    """Rotate each pair (a, b) of x's last axis to (a cos - b sin, b cos + a sin), in the dtype
    of x and cos; pairs are (x_i, x_{i+D/2}), or (x_{2i}, x_{2i+1}) when `interleaved`."""
    if interleaved:
        pairs = x_bthd.reshape(*x_bthd.shape[:-1], -1, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        return jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(x_bthd.shape)
    a, b = jnp.split(x_bthd, 2, axis=-1)
    return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def left_pad_positions(attention_mask: Array, start: Array | int = 0) -> Array:
    """Positions [B, T] of a chunk: start, start + 1, ... on its tokens (mask 1), 0 on pads."""
    mask = attention_mask.astype(jnp.int32)
    positions = jnp.asarray(start)[..., None] + jnp.cumsum(mask, axis=-1) - 1
    return jnp.where(mask > 0, positions, 0).astype(jnp.int32)


def grouped_attention(q_bthd, k, v, allowed_bts, *, heads_major=False, scale=None, mask_value=None,
                      probs_dropout: Callable[[Array], Array] | None = None) -> Array:
    """softmax(scale q k^T, -> mask_value where not allowed) v, [B, T, H, D] in q's dtype.

    K/V: [B, S, G, D], or [B, G, S, D] when `heads_major` (the cache); query head h reads K/V
    head h // (H / G). scale: on the float32 scores (None: 1 / sqrt(D)). mask_value: None is
    float32's most negative finite number, which leaves a fully masked row uniform, not NaN.
    """
    b, t, h, d = q_bthd.shape
    g = k.shape[1 if heads_major else 2]
    # With a K/V head per query head the group axis is left out: XLA:CPU runs these 4-D dots
    # about 1.4x faster (forward + backward at ChatGLM-6B's head shape) than with a unit group axis.
    q_axes, score_axes = ("btgd", "bgts") if g == h else ("btgrd", "bgrts")
    kv_axes = "bgsd" if heads_major else "bsgd"
    q = q_bthd if g == h else q_bthd.reshape(b, t, g, h // g, d)
    # accum_einsum: the backward's matmuls take bf16 operands too (autodiff of a float32-out einsum
    # would run all four of them in float32).
    scores = accum_einsum(f"{q_axes},{kv_axes}->{score_axes}", q, k)
    scores = scores * (d**-0.5 if scale is None else scale)
    allowed = allowed_bts.reshape(b, *(1,) * (scores.ndim - 3), *allowed_bts.shape[1:])
    fill = jnp.finfo(jnp.float32).min if mask_value is None else mask_value
    probs = jax.nn.softmax(jnp.where(allowed, scores, fill), axis=-1).astype(v.dtype)
    if probs_dropout is not None:
        probs = probs_dropout(probs)
    # From heads-major V the output is written heads-major too and T moved forward after: XLA:CPU
    # has no bf16 x bf16 -> float32 dot that writes [B, T, G, R, D] from [B, G, S, D].
    out_axes = score_axes[:-1] + "d" if heads_major else q_axes
    out = accum_einsum(f"{score_axes},{kv_axes}->{out_axes}", probs, v)
    if heads_major:
        out = jnp.moveaxis(out, -2, 1)
    return out.reshape(b, t, h, d).astype(q_bthd.dtype)


def causal_attention(q_bthd, k_btgd, v_btgd, allowed_bts, *, blocks: int = 4, min_rows: int = 64,
                     **attention) -> Array:
    """`grouped_attention` (S = T, K/V [B, T, G, D]) for a causal mask, allowed[b, t, s] only where
    s <= t, with the queries split into up to `blocks` row blocks of at least `min_rows` rows, block
    [lo, hi) reading keys [0, hi). The blocks above the diagonal are never computed (3/8 of the
    scores at 4 blocks), and XLA:CPU runs the smaller score blocks faster too: one SmolLM2-135M
    layer (8 x 256 tokens), forward + backward, f32 95 -> 62 ms, bf16 67 -> 51 ms; a bf16
    CGC-LoRA training step on every block linear (8 x 320 tokens) 9.65 -> 7.84 s. Same result as
    grouped_attention, also for a row with no allowed key: the mean of all T values."""
    b, t, h, d = q_bthd.shape
    n = min(blocks, t // min_rows)
    if n < 2 or attention.get("probs_dropout") is not None:
        return grouped_attention(q_bthd, k_btgd, v_btgd, allowed_bts, **attention)
    edges = [t * i // n for i in range(n + 1)]
    out = jnp.concatenate([
        grouped_attention(q_bthd[:, lo:hi], k_btgd[:, :hi], v_btgd[:, :hi], allowed_bts[:, lo:hi, :hi], **attention)
        for lo, hi in zip(edges[:-1], edges[1:])], axis=1)
    # A row with no allowed key: grouped_attention's softmax over T equal scores, probabilities
    # 1/T in the values' dtype, here over a block's keys only; give it the mean over all T.
    g = k_btgd.shape[2]
    weight = jnp.asarray(1.0 / t, jnp.float32).astype(v_btgd.dtype).astype(jnp.float32)
    mean = (jnp.sum(v_btgd.astype(jnp.float32), axis=1) * weight).astype(q_bthd.dtype)  # [B, G, D]
    mean = jnp.broadcast_to(mean[:, None, :, None, :], (b, t, g, h // g, d)).reshape(b, t, h, d)
    dead = ~jnp.any(allowed_bts, axis=-1)
    return jnp.where(dead[:, :, None, None], mean, out)


def cached_attention(q_bthd, k_btgd, v_btgd, allowed_bts, layer_cache: dict | None = None,
                     index: Array | int = 0, causal: bool = False, **attention) -> tuple[Array, dict | None]:
    """`grouped_attention` over this chunk's K/V alone (no cache: S = T; `causal_attention` when
    the caller's mask is causal), or over the layer's cache after writing the chunk's K/V at slots
    [index, index + T). Returns (out, layer_cache).

    An `index` that is the Python int 0 says the cache is empty (generation's prefill): every key
    the chunk may see is its own, so attention reads the chunk's K/V alone, as without a cache
    (causal blocks included), and the cache is only written. SmolLM2-135M prefill in bf16 on a
    2-core AVX-512 BF16 CPU (bench/decode.py --parts prefill): 64 x 256 tokens 20.2 -> 16.0 s,
    64 x 512 tokens 45.1 -> 32.1 s, against attending over every cache slot. Same result for
    every row with a visible key; a row without one (a left pad's query, which no real token
    reads) averages the chunk's values instead of the cache's."""
    fresh = isinstance(index, int) and index == 0
    if layer_cache is None or fresh:
        attend = causal_attention if causal else grouped_attention
        t = q_bthd.shape[1]
        out = attend(q_bthd, k_btgd, v_btgd, allowed_bts[..., :t], **attention)
        if layer_cache is None:
            return out, None

    def write(cached, new_btgd):
        new = new_btgd.transpose(0, 2, 1, 3).astype(cached.dtype)
        if cached.dtype.itemsize != 2:
            return jax.lax.dynamic_update_slice(cached, new, (0, 0, index, 0))
        # XLA:CPU widens a bfloat16 dynamic-update-slice to float32, converting the whole layer's
        # cache there and back at every step; on the 16-bit pattern the write stays in place.
        bits = jax.lax.dynamic_update_slice(jax.lax.bitcast_convert_type(cached, jnp.uint16),
                                            jax.lax.bitcast_convert_type(new, jnp.uint16), (0, 0, index, 0))
        return jax.lax.bitcast_convert_type(bits, cached.dtype)

    layer_cache = {"key": write(layer_cache["key"], k_btgd), "value": write(layer_cache["value"], v_btgd)}
    if fresh:
        return out, layer_cache
    k, v = layer_cache["key"].astype(q_bthd.dtype), layer_cache["value"].astype(q_bthd.dtype)
    return grouped_attention(q_bthd, k, v, allowed_bts, heads_major=True, **attention), layer_cache


def init_kv_cache(batch: int, length: int, layers: int, kv_heads: int, head_dim: int, dtype,
                  positions: tuple[str, ...]) -> dict:
    """The empty cache of the module docstring: nothing valid, every named position 0."""
    shape = (batch, kv_heads, length, head_dim)
    return {
        "index": jnp.zeros((), jnp.int32),
        "valid": jnp.zeros((batch, length), bool),
        "layers": tuple({"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}
                        for _ in range(layers)),
        **{name: jnp.zeros((batch,), jnp.int32) for name in positions},
    }


def cache_slots(cache: dict, attention_mask: Array) -> tuple[Array, Array]:
    """(valid [B, S] with the chunk's mask written at slots [index, index + T), causal [T, S]:
    the chunk's token i, at slot index + i, may see slot s <= index + i)."""
    index, t = cache["index"], attention_mask.shape[1]
    valid = jax.lax.dynamic_update_slice(cache["valid"], attention_mask.astype(bool), (0, index))
    slots = jnp.arange(valid.shape[1])
    return valid, slots[None, :] <= (index + jnp.arange(t))[:, None]


class FamilyModule(nn.Module):
    """The fields every module of a family carries, and its dense layers (CGC-LoRA capable)."""

    config: Any  # the family's config dataclass
    lora: CGCLoRAConfig | None = None  # adapters on the layers lora.targets matches (None: none)
    dtype: Any = jnp.float32  # activation / compute dtype
    param_dtype: Any = jnp.float32  # parameter storage dtype

    @property
    def fields(self) -> tuple:
        """(config, lora, dtype, param_dtype): what a child module of the family is built with."""
        return self.config, self.lora, self.dtype, self.param_dtype

    @nn.nowrap
    def dense(self, features: int, use_bias: bool, name: str | None = None) -> Dense:
        return Dense(features, use_bias, self.lora, self.dtype, self.param_dtype, name=name)


class CausalLM(FamilyModule):
    """A family's top module: `remat` for its blocks and the task gate that routes the adapters.

    Subclasses build their layers in `setup` after calling `super().setup()`.
    """

    remat: bool = False  # rematerialise each block in the backward pass

    @classmethod
    def build(cls, config, *, dtype=jnp.float32, param_dtype=jnp.float32, lora: CGCLoRAConfig | None = None,
              remat: bool = False) -> CausalLM:
        """The family's module constructor (models/family_spec.py `ModelFamily.build`)."""
        return cls(config, lora=lora, dtype=dtype, param_dtype=param_dtype, remat=remat)

    def setup(self):
        if self.lora is not None:
            self.task_gate = TaskRouting(self.lora)

    def _adapters(self, task_ids: Array | None, batch_size: int) -> AdapterInputs | None:
        """Each row's task routing for the adapters (None without adapters)."""
        return None if self.lora is None else self.task_gate(task_ids, batch_size)
