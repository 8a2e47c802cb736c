"""Decode slots over one preallocated KV cache: each slot at its own length, its own task.

A slot group holds S slots of L cache positions each. The cache is S stacked batch-1 caches of
the model's own `init_cache(1, L)` (leaves [S, *row_shape]), so every slot has its own write
index, and one decode step is the model's `decode` vmapped over the slots:

    logits_s, row_s = decode(token_s [1, 1], task_s [1], cache = row_s)      for s = 0..S-1

One compiled program per group (S and L fixed); mixed tasks share it through the fused
CGC-LoRA layer (task_ids per row). A free slot runs along with junk input: its work is wasted
but harmless, since insertion replaces the whole row.

Prefill: P prompts, left-padded to a bucket length T (one program per T, compiled at start-up),
go through the ordinary batched `decode` into a temporary [P, T] cache. Each row is then moved
into its slot, compacted: the row's sequence axis is rolled left by its pad count, so its n real
tokens occupy positions [0, n) and the slot's write index is n (no cache position is lost to
padding; cached keys carry their RoPE positions already, and positions count real tokens, so
moving slots changes nothing the model computes). Rows of a P-batch that carry no request have
slot id S and are dropped by the scatter.

The family contract this relies on (models/family.py): `init_cache(batch, length)` returns a
pytree whose leaves have the batch on axis 0 except one 0-d leaf, the write index; leaves with a
sequence axis have length `length` there. `cache_layout` finds these axes from shapes alone.

Token choice per row, in float32 (models/generate.py `filter_logits` for top-k / top-p):

    greedy (temperature 0):  argmax_v l
    sampling:                draw from softmax(filter(l / temperature)), key = fold(seed, k)

where k is the index of the token in the answer: a seeded request's answer does not depend on
what else shares its batch.

    group = SlotGroup(model, params, slots=8, length=256, prefill_batch=4)
    first = group.prefill([ids_a, ids_b], 32, task_ids=[0, 2], slot_ids=[5, 1],
                          sampling=Sampling.greedy(4), pad_id=0)              # first tokens [2]
    tokens = group.step(task_ids_s, Sampling.greedy(8), counts_s)             # next tokens [S]
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cgc_lora_jax.models.generate import filter_logits

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Per leaf of the model's cache (flattened order): its batch axis and sequence axis."""

    treedef: Any
    batch_axes: tuple[int | None, ...]  # None: the write index (0-d)
    seq_axes: tuple[int | None, ...]  # None: no sequence axis (per-row positions, the index)

    @property
    def index_leaf(self) -> int:
        return self.batch_axes.index(None)


def _changed_axis(a: tuple[int, ...], b: tuple[int, ...]) -> int | None:
    diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    return diff[0] if diff else None


def cache_layout(model) -> CacheLayout:
    """Which axis of each cache leaf grows with the batch and which with the length."""
    base = jax.eval_shape(lambda: model.init_cache(1, 8))
    wider = jax.tree.leaves(jax.eval_shape(lambda: model.init_cache(2, 8)))
    longer = jax.tree.leaves(jax.eval_shape(lambda: model.init_cache(1, 9)))
    leaves, treedef = jax.tree.flatten(base)
    batch_axes = tuple(_changed_axis(x.shape, y.shape) for x, y in zip(leaves, wider))
    seq_axes = tuple(_changed_axis(x.shape, y.shape) for x, y in zip(leaves, longer))
    scalars = [i for i, x in enumerate(leaves) if x.ndim == 0]
    if len(scalars) != 1 or batch_axes[scalars[0]] is not None or any(
            a not in (0,) for i, a in enumerate(batch_axes) if i != scalars[0]):
        raise ValueError(f"{type(model).__name__}.init_cache: expected one 0-d write index and the batch "
                         f"on axis 0 of every other leaf; got shapes {[x.shape for x in leaves]}")
    return CacheLayout(treedef, batch_axes, seq_axes)


@dataclasses.dataclass
class Sampling:
    """Per-row sampling settings (numpy on the host, jax arrays inside programs)."""

    temperature: Any  # [R] float32; 0 = greedy
    top_k: Any  # [R] int32; 0 = no limit
    top_p: Any  # [R] float32; 1 = no limit
    seed: Any  # [R, 2] uint32: low and high 32 bits of the request's seed

    @classmethod
    def greedy(cls, rows: int) -> Sampling:
        return cls(np.zeros(rows, np.float32), np.zeros(rows, np.int32), np.ones(rows, np.float32),
                   np.zeros((rows, 2), np.uint32))

    def set_row(self, row: int, temperature: float, top_k: int, top_p: float, seed: int) -> None:
        self.temperature[row], self.top_k[row], self.top_p[row] = temperature, top_k, top_p
        self.seed[row] = (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)

    def as_jax(self) -> tuple:
        return tuple(jnp.asarray(x) for x in (self.temperature, self.top_k, self.top_p, self.seed))


jax.tree_util.register_pytree_node(
    Sampling, lambda s: ((s.temperature, s.top_k, s.top_p, s.seed), None), lambda _, c: Sampling(*c))


def choose_rows(logits: Array, sampling: Sampling, counts: Array) -> Array:
    """Next token per row [R] int32 from logits [R, V]; see the module docstring."""
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    greedy = sampling.temperature <= 0

    def draw():
        def row(l_v, temperature, top_k, top_p, seed, count):
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed[0]), seed[1]), count)
            l_v = l_v.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
            return jax.random.categorical(key, filter_logits(l_v[None], top_k, top_p)[0]).astype(jnp.int32)

        return jax.vmap(row)(logits, sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed, counts)

    # The sort behind top-k / top-p costs more than a decode step of a small model: skip it
    # when every row is greedy.
    drawn = jax.lax.cond(jnp.all(greedy), lambda: best, draw)
    return jnp.where(greedy, best, drawn)


def _to_rows(layout: CacheLayout, cache: Any, pads: Array, lengths: Array, length: int) -> list[Array]:
    """The [P, T] prefill cache as P compacted slot rows, leaves [P, *row_shape] (see above)."""
    rows = []
    for i, leaf in enumerate(jax.tree.leaves(cache)):
        if layout.batch_axes[i] is None:  # the write index: each row's real token count
            rows.append(lengths.astype(leaf.dtype))
            continue
        seq = layout.seq_axes[i]

        def one(x, pad, seq=seq):
            x = x[None]  # back to a batch-1 row
            if seq is None:
                return x
            x = jnp.roll(x, -pad, axis=seq)
            size = x.shape[seq]
            if size >= length:
                return jax.lax.slice_in_dim(x, 0, length, axis=seq)
            widths = [(0, 0)] * x.ndim
            widths[seq] = (0, length - size)
            return jnp.pad(x, widths)  # zeros: unwritten, invalid positions

        rows.append(jax.vmap(one)(leaf, pads))
    return rows


class SlotGroup:
    """S decode slots of one model (a cluster's adapters, or the bare base) over its KV cache.

    model: a family module (with `lora` for adapters, task_ids per row; without, task_ids are
    ignored); params: its "params" (the base arrays shared, never copied).
    """

    def __init__(self, model, params, *, slots: int, length: int, prefill_batch: int):
        if prefill_batch > slots:
            raise ValueError(f"prefill_batch={prefill_batch} > slots={slots}")
        self.model, self.params = model, params
        self.slots, self.length, self.prefill_batch = slots, length, prefill_batch
        self.layout = cache_layout(model)
        self.adapted = getattr(model, "lora", None) is not None
        # Committed to one device from the start, as the programs' outputs are: an uncommitted
        # first input would compile every program a second time at its first real call.
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        init = jax.jit(jax.vmap(lambda _: model.init_cache(1, length)), out_shardings=device)
        self.cache = init(jnp.arange(slots))
        self.tokens = jax.device_put(jnp.zeros((slots,), jnp.int32), device)  # each slot's last token

    @property
    def cache_bytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self.cache))

    def _task_ids(self, task_ids):
        return jnp.asarray(task_ids, jnp.int32) if self.adapted else None

    def prefill(self, prompts: list[list[int]], bucket: int, task_ids, slot_ids, sampling: Sampling,
                pad_id: int) -> np.ndarray:
        """Prefill up to `prefill_batch` prompts (left-padded to `bucket`) into `slot_ids`;
        returns each prompt's first new token."""
        rows = self.prefill_batch
        ids = np.full((rows, bucket), pad_id, np.int32)
        mask = np.zeros((rows, bucket), np.int32)
        targets = np.full(rows, self.slots, np.int32)  # slot S: dropped by the scatter
        tasks = np.zeros(rows, np.int32)
        for r, prompt in enumerate(prompts):
            ids[r, bucket - len(prompt):], mask[r, bucket - len(prompt):] = prompt, 1
            targets[r], tasks[r] = slot_ids[r], task_ids[r]
        first, self.tokens, self.cache = _prefill(
            self.model, self.layout, self.length, self.params, self.cache, self.tokens, jnp.asarray(ids),
            jnp.asarray(mask), self._task_ids(tasks), jnp.asarray(targets), sampling)
        return np.asarray(first)[: len(prompts)]

    def step(self, task_ids, sampling: Sampling, counts) -> np.ndarray:
        """One decode step of every slot: the next token of each [S]."""
        self.tokens, self.cache = _decode(self.model, self.params, self.cache, self.tokens,
                                          self._task_ids(task_ids), sampling, jnp.asarray(counts, jnp.int32))
        return np.asarray(self.tokens)


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(4, 5))
def _prefill(model, layout, length, params, cache, tokens, input_ids, mask, task_ids, slot_ids, sampling):
    batch, bucket = input_ids.shape
    temp = model.init_cache(batch, bucket)
    logits, temp = model.apply({"params": params}, input_ids, mask, task_ids, cache=temp, method=model.decode)
    first = choose_rows(logits[:, -1], sampling, jnp.zeros((batch,), jnp.int32))
    lengths = jnp.sum(mask, axis=1, dtype=jnp.int32)
    rows = _to_rows(layout, temp, bucket - lengths, lengths, length)
    leaves = [big.at[slot_ids].set(row, mode="drop") for big, row in zip(jax.tree.leaves(cache), rows)]
    return first, tokens.at[slot_ids].set(first, mode="drop"), jax.tree.unflatten(layout.treedef, leaves)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2, 3))
def _decode(model, params, cache, tokens, task_ids, sampling, counts):
    variables = {"params": params}

    def one(token, task_id, row):
        task = None if task_id is None else task_id[None]
        logits, row = model.apply(variables, token[None, None], jnp.ones((1, 1), jnp.int32), task, cache=row,
                                  method=model.decode)
        return logits[0, -1], row

    logits, cache = jax.vmap(one, in_axes=(0, None if task_ids is None else 0, 0))(tokens, task_ids, cache)
    return choose_rows(logits, sampling, counts), cache
