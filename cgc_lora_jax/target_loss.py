"""Cross-entropy of the target tokens through a frozen output head, without the [B, T, V] logits.

The training loss (train_step.py) only reads the log-probability of each target token. On a
real vocabulary (49152 for SmolLM2) the full logits of every position are the largest tensor of
the step ([8, 256, 49152] float32 = 400 MB, several times over in the backward), and the head's
matmul over prompt and padding positions is wasted work. Here, with hidden states h [B, T, d]
and the frozen head W [V, d] (logits = h W^T):

    rows   = the (b, i) with labels[b, i + 1] != IGNORE, moved to the front (stable order)
    nll_n  = logsumexp(h_n W^T) - (h_n W^T)[y_n]                 for rows n in chunks of C
    dnll_n / dh_n = (softmax(h_n W^T) - onehot(y_n)) W           computed in the same pass

Chunks of C rows go through a `lax.scan`; a chunk without targets is skipped (`lax.cond`), so
the head runs on ceil(targets / C) chunks. The gradient with respect to h is formed in the
forward pass (a custom VJP), so the backward needs no [C, V] array and no second head forward;
only [B*T, d] is kept. W is held constant (stop_gradient): use this for a frozen head only.
Matmuls take h's dtype with float32 accumulation; softmax and logsumexp are float32.

    per_example_nll, counts = target_token_sums(hidden_btd, head_vd, labels_bt)   # [B], [B]
    loss = per_example_nll.sum() / counts.sum()      # == token_losses' token mean
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cgc_lora_jax.loss import IGNORE  # label of positions without loss

Array = jax.Array
DEFAULT_CHUNK = 256  # rows per head matmul: a [256, V] float32 block is 50 MB at V = 49152


def _chunk_nll_and_grad(h_cd: Array, head_vd: Array, targets_c: Array, mask_c: Array) -> tuple[Array, Array]:
    """nll [C] (0 on masked rows) and dnll/dh [C, d] float32 (0 on masked rows) of one chunk."""
    logits = jnp.einsum("cd,vd->cv", h_cd, head_vd, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets_c[:, None], axis=-1)[:, 0]
    nll = jnp.where(mask_c, lse - target_logit, 0.0)
    dlogits = jnp.exp(logits - lse[:, None])
    dlogits = dlogits - jax.nn.one_hot(targets_c, logits.shape[-1], dtype=jnp.float32)
    dlogits = jnp.where(mask_c[:, None], dlogits, 0.0).astype(h_cd.dtype)
    dh = jnp.einsum("cv,vd->cd", dlogits, head_vd, preferred_element_type=jnp.float32)
    return nll, dh


def _rows_nll_and_grad(h_nd, head_vd, targets_n, mask_n, chunk: int):
    """Chunked scan over rows (N a multiple of `chunk`); chunks without a target are skipped."""
    n, d = h_nd.shape
    head_vd = head_vd.astype(h_nd.dtype)

    def body(_, xs):
        h, targets, mask = xs
        skip = lambda *_: (jnp.zeros((chunk,), jnp.float32), jnp.zeros((chunk, d), jnp.float32))
        compute = lambda h, t, m: _chunk_nll_and_grad(h, head_vd, t, m)
        return None, jax.lax.cond(jnp.any(mask), compute, skip, h, targets, mask)

    xs = (h_nd.reshape(-1, chunk, d), targets_n.reshape(-1, chunk), mask_n.reshape(-1, chunk))
    _, (nll, dh) = jax.lax.scan(body, None, xs)
    return nll.reshape(n), dh.reshape(n, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _rows_nll(h_nd, head_vd, targets_n, mask_n, chunk):
    return _rows_nll_and_grad(h_nd, head_vd, targets_n, mask_n, chunk)[0]


def _rows_nll_fwd(h_nd, head_vd, targets_n, mask_n, chunk):
    nll, dh = _rows_nll_and_grad(h_nd, head_vd, targets_n, mask_n, chunk)
    h_dtype = jnp.zeros((0,), h_nd.dtype)  # residuals are arrays: carry h's dtype as an empty one
    return nll, (dh, h_dtype, head_vd)


def _rows_nll_bwd(chunk, residuals, g_n):
    dh, h_dtype, head_vd = residuals
    # Row n's nll depends on h_n only, so its cotangent just scales that row's gradient.
    return (g_n[:, None] * dh).astype(h_dtype.dtype), jnp.zeros_like(head_vd), None, None


_rows_nll.defvjp(_rows_nll_fwd, _rows_nll_bwd)


def target_token_sums(
    hidden_btd: Array, head_vd: Array, labels_bt: Array, chunk: int = DEFAULT_CHUNK
) -> tuple[Array, Array]:
    """Summed target-token cross-entropy [B] float32 and target counts [B] float32 of a batch.

    hidden_btd: the final hidden states (after the last norm) [B, T, d]; position i predicts
    labels[:, i + 1]. head_vd: the frozen output matrix [V, d] (tied embeddings, or lm_head's
    kernel transposed); it gets no gradient. labels_bt: ids, IGNORE where no loss is taken.
    """
    b, t, d = hidden_btd.shape
    targets = labels_bt[:, 1:].reshape(-1)
    mask = targets != IGNORE
    example = jnp.repeat(jnp.arange(b), t - 1)
    order = jnp.argsort(~mask, stable=True)  # target rows first, so trailing chunks are all skipped
    pad = -order.shape[0] % chunk
    order = jnp.pad(order, (0, pad))  # padded rows repeat row 0 and are masked out below
    valid = jnp.pad(mask[order[: order.shape[0] - pad]], (0, pad))
    h_nd = hidden_btd[:, :-1].reshape(-1, d)[order]
    nll = _rows_nll(h_nd, jax.lax.stop_gradient(head_vd), jnp.where(valid, targets[order], 0), valid, chunk)
    per_example = jax.ops.segment_sum(nll, example[order], num_segments=b)
    return per_example, mask.reshape(b, t - 1).sum(axis=1).astype(jnp.float32)
