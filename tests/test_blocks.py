"""models/blocks.py against float64 numpy references: RMSNorm's two cast orders, both RoPE pair
layouts, grouped attention in both K/V layouts, causal attention in row blocks, and the KV cache written
chunk by chunk."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from cgc_lora_jax.models.blocks import (RMSNorm, apply_rope, cache_slots, cached_attention, causal_attention,
                                        grouped_attention,
                                        init_kv_cache, left_pad_positions, rope_cos_sin, rope_inv_freq)

BF16 = ml_dtypes.bfloat16


def test_rms_norm_keeps_each_cast_order():
    """bf16 in: cast-then-scale rounds n and w * n to bf16; scale-then-cast rounds once."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 16)).astype(BF16)
    w = (1 + rng.standard_normal(16) * 0.3).astype(BF16)
    x64 = x.astype(np.float64)
    n = x64 / np.sqrt(np.mean(x64**2, axis=-1, keepdims=True) + 1e-5)
    want = {True: (w.astype(np.float64) * n.astype(BF16).astype(np.float64)).astype(BF16),
            False: (w.astype(np.float64) * n).astype(BF16)}
    got = {}
    for cast_before_scale in (True, False):
        norm = RMSNorm(1e-5, None, jnp.bfloat16, "scale", cast_before_scale)
        got[cast_before_scale] = np.asarray(norm.apply({"params": {"scale": jnp.asarray(w)}}, jnp.asarray(x)))
        assert got[cast_before_scale].dtype == BF16
        # float32 arithmetic against float64: at most one bf16 ulp apart
        err = np.abs(got[cast_before_scale].astype(np.float64) - want[cast_before_scale].astype(np.float64))
        assert np.all(err <= 2**-7 * np.abs(want[cast_before_scale].astype(np.float64)) + 1e-12)
    assert not np.array_equal(got[True], got[False])  # the order is visible in bf16


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_rotates_the_right_pairs(interleaved):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 3, 8)).astype(np.float32)
    positions = np.array([[0, 0, 1, 2, 3], [0, 1, 2, 3, 4]], np.int32)
    inv_freq = rope_inv_freq(8, 10000.0)
    np.testing.assert_allclose(inv_freq, 1 / 10000.0 ** (np.arange(0, 8, 2) / 8), rtol=1e-6)
    cos, sin = rope_cos_sin(jnp.asarray(positions), inv_freq, jnp.float32)
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin, interleaved))
    idx = np.arange(4)
    first, second = (2 * idx, 2 * idx + 1) if interleaved else (idx, idx + 4)
    angle = positions[:, :, None, None].astype(np.float64) * inv_freq.astype(np.float64)
    a, b = x[..., first].astype(np.float64), x[..., second].astype(np.float64)
    want = np.empty_like(x, np.float64)
    want[..., first], want[..., second] = a * np.cos(angle) - b * np.sin(angle), b * np.cos(angle) + a * np.sin(angle)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def attention_reference(q, k, v, allowed):
    """float64 softmax attention, K/V [B, S, G, D], query head h reads K/V head h // (H / G)."""
    h, g = q.shape[2], k.shape[2]
    k, v = np.repeat(k, h // g, axis=2).astype(np.float64), np.repeat(v, h // g, axis=2).astype(np.float64)
    scores = np.einsum("bthd,bshd->bhts", q.astype(np.float64), k) / np.sqrt(q.shape[-1])
    scores = np.where(allowed[:, None], scores, -1e30)  # finite: a pad row (never compared) stays uniform
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", probs, v)


@pytest.mark.parametrize("groups", [4, 2])
def test_grouped_attention_and_cache_match_reference(groups):
    rng = np.random.default_rng(2)
    b, t, h, d = 2, 6, 4, 8
    q = rng.standard_normal((b, t, h, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, t, groups, d)).astype(np.float32) for _ in range(2))
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], np.int32)  # row 0 left-padded by 2
    allowed = np.tril(np.ones((t, t), bool))[None] & mask[:, None, :].astype(bool)
    want = attention_reference(q, k, v, allowed)
    real = mask.astype(bool)
    for heads_major in (False, True):
        kk, vv = (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)) if heads_major else (k, v)
        got = np.asarray(grouped_attention(jnp.asarray(q), jnp.asarray(kk), jnp.asarray(vv), jnp.asarray(allowed),
                                           heads_major=heads_major))
        np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-5)
    # The cache, written as a 4-token prompt then one token at a time, gives the same rows; the
    # prompt's index given as the Python int 0 (an empty cache: the prompt attends over its own
    # keys alone) gives them too, and writes the same cache.
    caches = []
    for empty_known in (False, True):
        cache = init_kv_cache(b, t + 2, 1, groups, d, jnp.float32, ("next_position",))
        outs = []
        for start, stop in ((0, 4), (4, 5), (5, 6)):
            chunk_mask = jnp.asarray(mask[:, start:stop])
            valid, causal = cache_slots(cache, chunk_mask)
            index = 0 if empty_known and start == 0 else cache["index"]
            out, layer = cached_attention(jnp.asarray(q[:, start:stop]), jnp.asarray(k[:, start:stop]),
                                          jnp.asarray(v[:, start:stop]), causal[None] & valid[:, None, :],
                                          cache["layers"][0], index, causal=True)
            cache = {**cache, "index": cache["index"] + stop - start, "valid": valid, "layers": (layer,)}
            outs.append(np.asarray(out))
        np.testing.assert_allclose(np.concatenate(outs, 1)[real], want[real], rtol=1e-5, atol=1e-5)
        caches.append(cache)
    for before, after in zip(jax.tree.leaves(caches[0]), jax.tree.leaves(caches[1])):
        np.testing.assert_array_equal(np.asarray(before), np.asarray(after))


@pytest.mark.parametrize("t, blocks, min_rows", [(37, 4, 8), (40, 3, 8), (24, 4, 16)])
def test_causal_attention_in_row_blocks_equals_grouped_attention(t, blocks, min_rows):
    """Row blocks reading keys up to their last row give grouped_attention's output and gradients
    for causal masks with left padding (rows with no allowed key included) and packed segments;
    blocks of unequal size, and one block (no split) when the rows are too few."""
    from cgc_lora_jax.data.packing import segment_mask

    rng = np.random.default_rng(4)
    b, h, g, d = 3, 4, 2, 8
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    k, v, cot = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((b, t, g, d),) * 2 + ((b, t, h, d),))
    lengths = np.array([t, t - 11, 5])  # left-padded rows: their pad rows see no key at all
    mask = np.arange(t)[None, :] >= (t - lengths)[:, None]
    causal = np.tril(np.ones((t, t), bool))[None] & mask[:, None, :]
    segments = np.minimum(np.arange(t)[None, :] // 9 + 1, 3) * (np.arange(t)[None, :] < t - 4)
    packed = np.asarray(segment_mask(jnp.asarray(np.repeat(segments, b, 0))))
    for allowed in (causal, packed):
        allowed = jnp.asarray(allowed)

        def loss(attend, q, k, v):
            return jnp.sum(attend(q, k, v, allowed) * cot)

        blocked = jax.value_and_grad(lambda *a: loss(lambda *x: causal_attention(*x, blocks=blocks, min_rows=min_rows), *a),
                                     argnums=(0, 1, 2))(q, k, v)
        whole = jax.value_and_grad(lambda *a: loss(grouped_attention, *a), argnums=(0, 1, 2))(q, k, v)
        np.testing.assert_allclose(np.asarray(causal_attention(q, k, v, allowed, blocks=blocks, min_rows=min_rows)),
                                   np.asarray(grouped_attention(q, k, v, allowed)), rtol=1e-5, atol=1e-6)
        for got, want in zip(jax.tree.leaves(blocked), jax.tree.leaves(whole)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert not mask[2, :t - 5].any()  # the test has rows with no allowed key


def test_grouped_attention_in_bfloat16_over_the_cache_runs():
    """XLA:CPU has no bf16 x bf16 -> f32 dot writing [B, T, G, R, D] from heads-major V; the block
    writes heads-major and moves T after, so bf16 decoding runs (and stays near float32)."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 1, 4, 8)).astype(np.float32)
    k, v = (rng.standard_normal((1, 2, 5, 8)).astype(np.float32) for _ in range(2))
    allowed = jnp.ones((1, 1, 5), bool)
    f32 = np.asarray(grouped_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), allowed, heads_major=True))
    bf16 = grouped_attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)), allowed, heads_major=True)
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(bf16, np.float32), f32, rtol=3e-2, atol=3e-2)


def test_left_pad_positions():
    mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(left_pad_positions(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(left_pad_positions(jnp.ones((2, 1)), jnp.asarray([3, 5])), [[3], [5]])
