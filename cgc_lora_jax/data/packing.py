"""Packing several short samples into one row: fewer padding tokens per training step.

A right-padded batch spends B * T - sum(lengths) token slots on padding; with prompts of very
different lengths (PromptCBLUE's run from tens to thousands of tokens) that is most of a batch.
Packing places whole samples one after another in rows of `row_length` tokens (first-fit
decreasing, samples of one task per row so that the row's task id still selects its adapters)
and marks each token with its segment:

    segment_ids [R, L]  1, 2, ... for the row's samples in order, 0 on padding
    positions   [R, L]  0, 1, ... restarting at each segment (RoPE positions as if alone)

The attention of a packed row is causal and block-diagonal over segments (`segment_mask`), so
every sample sees exactly the tokens it would see alone; each segment's first label is set to
IGNORE (in a single row that label is never predicted: position i predicts label i + 1), so the
summed target-token loss of a packed batch equals the sum of the samples' losses.

    rows = pack_lengths(lengths, task_of_sample, row_length=512)          # [[sample, ...], ...]
    arrays = packed_arrays(samples, rows, row_length=512, pad_token_id=0)
    logits = model.apply(v, arrays["input_ids"], None, arrays["task_ids"],
                         segment_ids=arrays["segment_ids"])
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cgc_lora_jax.loss import IGNORE


def pack_lengths(lengths: Sequence[int], tasks: Sequence[int], row_length: int) -> list[list[int]]:
    """Sample indices per row: first-fit decreasing within each task, rows in task order.

    A sample longer than row_length is an error (truncate it first): packing never cuts one.
    """
    lengths = np.asarray(lengths)
    too_long = np.flatnonzero(lengths > row_length)
    if too_long.size:
        raise ValueError(f"sample {int(too_long[0])} has {int(lengths[too_long[0]])} tokens > row_length "
                         f"{row_length} ({too_long.size} such samples): truncate before packing")
    rows: list[list[int]] = []
    for task in sorted(set(tasks)):
        members = [i for i in np.argsort(-lengths, kind="stable") if tasks[i] == task]
        free: list[int] = []  # room left in each of this task's rows
        first = len(rows)
        for i in members:
            fit = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
            if fit is None:
                rows.append([])
                free.append(row_length)
                fit = len(free) - 1
            rows[first + fit].append(int(i))
            free[fit] -= int(lengths[i])
    return rows


def packed_arrays(samples: Sequence[dict], rows: list[list[int]], row_length: int, pad_token_id: int) -> dict:
    """input_ids, labels, segment_ids [R, L] and task_ids [R] of packed rows (positions and the
    attention mask follow from segment_ids: `segment_positions`, `segment_mask`).

    samples[i]: {"input_ids": [n], "labels": [n], "task_id": int}; rows from `pack_lengths`.
    """
    r = len(rows)
    ids = np.full((r, row_length), pad_token_id, np.int32)
    labels = np.full((r, row_length), IGNORE, np.int32)
    segments = np.zeros((r, row_length), np.int32)
    task_ids = np.zeros((r,), np.int32)
    for row, members in enumerate(rows):
        start = 0
        for seg, i in enumerate(members, 1):
            n = len(samples[i]["input_ids"])
            ids[row, start:start + n] = samples[i]["input_ids"]
            labels[row, start:start + n] = samples[i]["labels"]
            labels[row, start] = IGNORE  # would be predicted from the previous sample's last token
            segments[row, start:start + n] = seg
            task_ids[row] = samples[i]["task_id"]
            start += n
    return {"input_ids": ids, "labels": labels, "segment_ids": segments, "task_ids": task_ids}


def padding_fraction(lengths: Sequence[int], row_tokens: int) -> float:
    """1 - real tokens / token slots, for batches that hold `row_tokens` slots in all."""
    return 1.0 - float(np.sum(lengths)) / row_tokens


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions [B, T] counting from 0 at each segment start (segments are contiguous)."""
    t = segment_ids.shape[-1]
    index = jnp.arange(t, dtype=jnp.int32)
    previous = jnp.pad(segment_ids[..., :-1], [(0, 0)] * (segment_ids.ndim - 1) + [(1, 0)], constant_values=-1)
    starts = jax.lax.cummax(jnp.where(segment_ids != previous, index, 0), axis=segment_ids.ndim - 1)
    return index - starts


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, T, S] attention mask: causal, within the same segment, never onto padding (id 0)."""
    t = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return jnp.tril(jnp.ones((t, t), bool))[None] & same & (segment_ids[:, None, :] != 0)
