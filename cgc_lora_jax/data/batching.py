"""Batches of an encoded split: mixed-task epochs without replacement, length bucketing, resume.

Epoch e of N samples in batches of B (rng = numpy.random.default_rng([seed, e])):

  1. order = rng.permutation(N): the samples of all tasks, shuffled together (the paper's
     Algorithm 1: within an epoch a sample is drawn once, never twice).
  2. last_batch="drop" leaves the last N mod B samples of that order out of this epoch (a
     different random few each epoch, so none is lost for good; the batch size stays fixed and
     the epoch plan depends on nothing but (seed, e)); last_batch="pad" keeps them in a final
     batch completed with filler rows, so every sample appears exactly once (use it for eval).
  3. Length bucketing: the order is cut into windows of sort_window_batches * B samples, each
     window is sorted by length (longest first, stable) and cut into batches of B, so a batch
     holds samples of similar length and less padding; which samples share a window is random.
  4. The batch order is shuffled with the same rng, so long and short batches interleave.
With shuffle=False (evaluation) the samples stay in their order, unsorted.

Arrays of a batch, right-padded to T = round_up(longest row, pad_multiple) (capped at max_length
when given), so jit sees at most max_length / pad_multiple shapes:

    input_ids      [B, T] int32  the pad id after each row
    labels         [B, T] int32  -100 on padding (and wherever the format puts no loss)
    attention_mask [B, T] int32  1 = token, 0 = padding
    task_ids       [B]    int32

A filler row repeats the batch's first row with all labels -100 (never an all-padding row, whose
fully masked attention could produce NaNs) and has sample_index -1. The padding fraction of a
batch is 1 - (tokens of its real rows) / (B * T).

The iterator's position is `state()` = {"seed", "epoch", "step", "num_samples", "batch_size"}, a
small JSON-able dict; `BatchIterator(split, ..., state=saved)` yields exactly the batches an
uninterrupted iterator would have yielded next (the plan of epoch e is recomputed from (seed, e)).

Usage::

    batches = BatchIterator(train, batch_size=64, seed=42, pad_multiple=64)
    batch = next(batches); step(state, base, batch.arrays()); batch.padding_fraction
    json.dumps(batches.state())
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from cgc_lora_jax.data.formatting import EncodedSplit
from cgc_lora_jax.loss import IGNORE

LAST_BATCH = ("drop", "pad")
_STATE_KEYS = ("seed", "epoch", "step", "num_samples", "batch_size")


def round_up(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def plan_epoch(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, *,
               shuffle: bool = True, sort_window_batches: int = 8,
               last_batch: str = "drop") -> np.ndarray:
    """Sample indices [num_batches, batch_size] of one epoch (-1 = filler row); see the module
    docstring for the four steps."""
    if last_batch not in LAST_BATCH:
        raise ValueError(f"last_batch must be one of {LAST_BATCH}, got {last_batch!r}")
    num = len(lengths)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(num) if shuffle else np.arange(num)
    if last_batch == "drop":
        order = order[:num - num % batch_size]
    if shuffle and sort_window_batches > 0:
        window = sort_window_batches * batch_size
        order = np.concatenate([chunk[np.argsort(-lengths[chunk], kind="stable")]
                                for chunk in np.split(order, range(window, len(order), window))]
                               ) if len(order) else order
    fillers = round_up(len(order), batch_size) - len(order)
    plan = np.concatenate([order, np.full(fillers, -1)]).reshape(-1, batch_size)
    return plan[rng.permutation(len(plan))] if shuffle else plan


@dataclasses.dataclass(frozen=True)
class Batch:
    input_ids: np.ndarray  # [B, T] int32
    labels: np.ndarray | None  # [B, T] int32; None for generation prompts
    attention_mask: np.ndarray  # [B, T] int32, 1 = token
    task_ids: np.ndarray  # [B] int32
    sample_index: np.ndarray  # [B] int64 index into the split, -1 = filler row
    padding_fraction: float  # share of the B * T positions that are padding or filler

    def arrays(self) -> dict[str, np.ndarray]:
        """The model inputs, for the training / eval step."""
        arrays = {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                  "task_ids": self.task_ids}
        return arrays if self.labels is None else {**arrays, "labels": self.labels}


def make_batch(split: EncodedSplit, indices: np.ndarray, *, pad_multiple: int = 64,
               max_length: int | None = None, padding_side: str = "right",
               rows: np.ndarray | None = None) -> Batch:
    """The batch of these sample indices (-1 = filler row), padded on `padding_side`
    ("left" for generation prompts). `rows` (positions in `indices`): build only these rows, a
    host's share of a global batch; the width and padding_fraction stay the whole batch's."""
    indices = np.asarray(indices, np.int64)
    real = indices[indices >= 0]
    if len(real) == 0:
        raise ValueError("a batch needs at least one real sample")
    lengths = np.array([len(split.input_ids[i]) for i in np.where(indices >= 0, indices, real[0])])
    width = round_up(int(lengths.max()), pad_multiple)
    if max_length is not None:
        if lengths.max() > max_length:
            raise ValueError(f"a sample has {lengths.max()} ids, more than max_length={max_length}")
        width = min(width, max_length)
    real_tokens = int(lengths[indices >= 0].sum())
    padding_fraction = 1.0 - real_tokens / (len(indices) * width)
    if rows is not None:
        indices, lengths = indices[rows], lengths[rows]
    rows = np.where(indices >= 0, indices, real[0])
    input_ids = np.full((len(rows), width), split.pad_id, np.int32)
    labels = np.full((len(rows), width), IGNORE, np.int32)
    attention_mask = np.zeros((len(rows), width), np.int32)
    for b, (i, n) in enumerate(zip(rows, lengths)):
        span = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[b, span] = split.input_ids[i]
        attention_mask[b, span] = 1
        if split.labels is not None and indices[b] >= 0:
            labels[b, span] = split.labels[i]
    return Batch(input_ids, None if split.labels is None else labels, attention_mask,
                 split.task_ids[rows].astype(np.int32), indices, padding_fraction)


def fitted_rows(count: int, batch_size: int, min_rows: int = 8) -> int:
    """Rows of a batch that holds `count` prompts: batch_size, or for fewer prompts the smallest
    2^k or 3 * 2^(k-1) >= count (at least min_rows; the ladder of generate's prompt buckets), so a
    short last batch computes few filler rows while the compiled shapes stay few (8, 12, 16, 24,
    32, 48, ..., batch_size): 20 prompts decode as 24 rows, 36 as 48."""
    if count >= batch_size:
        return batch_size
    power = 1 << max(count - 1, 0).bit_length()  # the next power of two >= count
    rows = 3 * power // 4 if 3 * power // 4 >= count else power
    return min(batch_size, max(min_rows, rows))


def prompt_batches(split: EncodedSplit, batch_size: int, *, pad_multiple: int = 64,
                   max_length: int | None = None, rows=None, fit_last: bool = False) -> Iterator[Batch]:
    """Left-padded generation batches of `rows` (default: every sample) in order; the last is
    completed with filler rows (sample_index -1) to batch_size rows, or with fit_last to
    `fitted_rows` (20 prompts in batches of 64: one batch of 24 rows, not 64)."""
    rows = np.arange(len(split)) if rows is None else np.asarray(rows, np.int64)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        indices = np.full(fitted_rows(len(chunk), batch_size) if fit_last else batch_size, -1, np.int64)
        indices[:len(chunk)] = chunk
        yield make_batch(split, indices, pad_multiple=pad_multiple, max_length=max_length,
                         padding_side="left")


class BatchIterator:
    """Endless right-padded training batches, epoch after epoch; see the module docstring."""

    def __init__(self, split: EncodedSplit, *, batch_size: int, seed: int, pad_multiple: int = 64,
                 max_length: int | None = None, sort_window_batches: int = 8, shuffle: bool = True,
                 last_batch: str = "drop", state: dict | None = None, rows: np.ndarray | None = None):
        if split.labels is None:
            raise ValueError("training batches need labels; this split was encoded for prediction")
        if batch_size < 1 or pad_multiple < 1:
            raise ValueError(f"batch_size and pad_multiple must be >= 1, got {batch_size}, "
                             f"{pad_multiple}")
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.pad_multiple, self.max_length = pad_multiple, max_length
        self.rows = rows  # this host's rows of each batch (None: all); see make_batch
        self._plan_args = dict(shuffle=shuffle, sort_window_batches=sort_window_batches,
                               last_batch=last_batch)
        self._lengths = split.lengths
        self.batches_per_epoch = len(self.plan(0))
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(split)} samples make no full batch of {batch_size} "
                             "(use a smaller batch_size or last_batch='pad')")
        self.epoch, self.step = 0, 0
        self._cached: tuple[int, np.ndarray] | None = None
        if state is not None:
            self._restore(state)

    def plan(self, epoch: int) -> np.ndarray:
        """Sample indices [batches_per_epoch, batch_size] of `epoch` (-1 = filler row)."""
        return plan_epoch(self._lengths, self.batch_size, self.seed, epoch, **self._plan_args)

    def _batch(self, indices: np.ndarray) -> Batch:
        return make_batch(self.split, indices, pad_multiple=self.pad_multiple,
                          max_length=self.max_length, rows=self.rows)

    def epoch_batches(self, epoch: int = 0) -> Iterator[Batch]:
        """The batches of one epoch, independent of the iterator's position (e.g. for eval)."""
        for indices in self.plan(epoch):
            yield self._batch(indices)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        if self._cached is None or self._cached[0] != self.epoch:
            self._cached = (self.epoch, self.plan(self.epoch))
        batch = self._batch(self._cached[1][self.step])
        self.step += 1
        if self.step == self.batches_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return batch

    def state(self) -> dict:
        """Where the next batch comes from: JSON-serialisable, for the checkpoint."""
        return {"seed": self.seed, "epoch": self.epoch, "step": self.step,
                "num_samples": len(self.split), "batch_size": self.batch_size}

    def _restore(self, state: dict) -> None:
        if sorted(state) != sorted(_STATE_KEYS):
            raise ValueError(f"iterator state must have the keys {_STATE_KEYS}, got {sorted(state)}")
        expected = {"seed": self.seed, "num_samples": len(self.split),
                    "batch_size": self.batch_size}
        wrong = {k: (state[k], v) for k, v in expected.items() if state[k] != v}
        if wrong:
            raise ValueError("iterator state is from different data or settings (saved, now): "
                             f"{wrong}")
        if not 0 <= state["step"] < self.batches_per_epoch or state["epoch"] < 0:
            raise ValueError(f"iterator state {state} is outside the {self.batches_per_epoch} "
                             "batches of an epoch")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
