"""The conditional language-model loss over target tokens, shared by training and evaluation.

Logits at position i predict the label at position i + 1; a label of IGNORE (prompt and
padding positions) counts for nothing:

    nll_bi = -log softmax(logits_bi)[labels_b,i+1]      mask_bi = labels_b,i+1 != IGNORE

    nll, mask = token_losses(logits, labels)
    loss = nll.sum() / mask.sum()            # the mean over every target token of the batch
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE = -100  # label of positions without loss


def token_losses(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy [B, T-1] (0 where ignored) and the mask of counted tokens."""
    targets = labels[:, 1:]
    mask = targets != IGNORE
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(mask, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(mask, nll, 0.0), mask
