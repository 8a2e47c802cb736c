"""GLM v1 (ChatGLM-6B) positions and attention visibility of a left-padded prompt: one definition,
used by the model (models/chatglm.py) and by the v1 tokenizer (models/chatglm_tokenizer.py).

For one unpadded prompt of n tokens, `text + [gMASK] + <sop> + ...`:

    context length c = index of <sop> (bos), n if absent;
    mask position m  = index of [MASK] if present, else of [gMASK] (the tokenizer's rule; the
                       original model's own fallback prefers [gMASK] when a row holds both);
    p = 0, 1, ..., c-1, m, m, ...      (0, 1, ..., n-1 without a mask token)
    b = 0, ..., 0, 1, 2, ...           (b = 1 at <sop>)
    query i sees key j iff j <= i or j < c   (bidirectional prompt, causal from <sop> on)

Left pads (attention_mask 0) get p = b = 0 and are never seen; their own rows see nothing.

    layout = glm_layout(input_ids, attention_mask, config)   # config: bos/mask/gmask token ids
    layout.position_ids   # [B, 2, T] rows (p, b)
    layout.visible        # [B, 1, T, T]; the original's attention mask is ~visible
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from cgc_lora_jax.models.blocks import left_pad_positions

Array = jax.Array


@struct.dataclass
class GLMLayout:
    """Positions and visibility of a (left-padded) prompt, as the original tokenizer builds them."""

    position_ids: Array  # [B, 2, T] int32: rows (p, b)
    visible: Array  # [B, 1, T, T] bool: query t sees key s (the original's mask is ~visible)
    context_slot: Array  # [B] int32: index of <sop> in the padded row (T if absent)


def glm_layout(input_ids: Array, attention_mask: Array | None, token_ids: Any) -> GLMLayout:
    """The module docstring's layout, per row, with left pads (attention_mask 0) excluded.

    token_ids: anything with `bos_token_id` (<sop>), `mask_token_id` and `gmask_token_id`: the
    model's ChatGLMConfig or the v1 tokenizer. attention_mask None: every token is real.
    """
    batch, length = input_ids.shape
    real = jnp.ones((batch, length), bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
    real_index = left_pad_positions(real)  # index among the row's real tokens (0 on pads)
    slots = jnp.arange(length, dtype=jnp.int32)

    def first(token_id):  # (present?, slot of the first real occurrence)
        hit = (input_ids == token_id) & real
        return hit.any(axis=1), jnp.argmax(hit, axis=1).astype(jnp.int32)

    has_bos, bos_slot = first(token_ids.bos_token_id)
    has_mask, mask_slot = first(token_ids.mask_token_id)
    has_gmask, gmask_slot = first(token_ids.gmask_token_id)
    context_slot = jnp.where(has_bos, bos_slot, length)
    mask_slot = jnp.where(has_mask, mask_slot, gmask_slot)
    mask_position = jnp.take_along_axis(real_index, mask_slot[:, None], axis=1)
    bos_index = jnp.take_along_axis(real_index, bos_slot[:, None], axis=1)  # c, where <sop> exists

    in_block = real & (slots[None, :] >= context_slot[:, None])
    positions = jnp.where(in_block & (has_mask | has_gmask)[:, None], mask_position, real_index)
    block_positions = jnp.where(in_block, real_index - bos_index + 1, 0)

    causal = slots[None, :, None] >= slots[None, None, :]
    in_context = slots[None, None, :] < context_slot[:, None, None]
    visible = (causal | in_context) & real[:, :, None] & real[:, None, :]
    return GLMLayout(
        position_ids=jnp.stack([positions, block_positions], axis=1),
        visible=visible[:, None],
        context_slot=context_slot,
    )
