"""Tests for cgc_lora_jax/batching.py on hand-made encoded splits: padding values and fraction,
epochs without replacement across mixed tasks, bucketing, shapes, and resume determinism."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from cgc_lora_jax.data.batching import BatchIterator, fitted_rows, make_batch, plan_epoch, prompt_batches
from cgc_lora_jax.data.formatting import EncodedSplit
from cgc_lora_jax.loss import IGNORE

PAD = 0


def make_split(lengths, num_tasks=3, seed=0) -> EncodedSplit:
    """Sample i has ids 1000 + i (so rows identify their sample), the first half of each row
    unlabelled, task i mod num_tasks."""
    input_ids, labels = [], []
    for i, n in enumerate(lengths):
        ids = np.full(n, 1000 + i, np.int32)
        row_labels = ids.copy()
        row_labels[: n // 2] = IGNORE
        input_ids.append(ids)
        labels.append(row_labels)
    task_ids = np.arange(len(lengths), dtype=np.int32) % num_tasks
    return EncodedSplit(input_ids, labels, task_ids, [f"s{i}" for i in range(len(lengths))], PAD,
                        Counter())


def random_split(num, seed=0):
    return make_split(np.random.default_rng(seed).integers(3, 120, size=num))


def test_hand_made_batch_values_and_padding_fraction():
    split = make_split([3, 5])
    batch = make_batch(split, np.array([0, 1]), pad_multiple=4)
    # T = round_up(5, 4) = 8; 16 positions, 8 real tokens -> padding fraction 0.5.
    np.testing.assert_array_equal(batch.input_ids, [[1000] * 3 + [PAD] * 5, [1001] * 5 + [PAD] * 3])
    np.testing.assert_array_equal(batch.labels, [[IGNORE, 1000, 1000] + [IGNORE] * 5,
                                                 [IGNORE, IGNORE, 1001, 1001, 1001] + [IGNORE] * 3])
    np.testing.assert_array_equal(batch.attention_mask, [[1] * 3 + [0] * 5, [1] * 5 + [0] * 3])
    np.testing.assert_array_equal(batch.task_ids, [0, 1])
    assert batch.padding_fraction == 0.5
    assert batch.input_ids.dtype == batch.labels.dtype == batch.task_ids.dtype == np.int32
    assert set(batch.arrays()) == {"input_ids", "labels", "attention_mask", "task_ids"}


def test_filler_row_copies_inputs_without_labels():
    split = make_split([3, 6, 2])
    batch = make_batch(split, np.array([2, -1]), pad_multiple=4)
    np.testing.assert_array_equal(batch.input_ids[1], batch.input_ids[0])
    assert np.all(batch.labels[1] == IGNORE) and list(batch.sample_index) == [2, -1]
    assert batch.padding_fraction == 1 - 2 / 8  # one real row of 2 tokens in [2, 4]
    assert make_batch(split, np.array([0, 1]), pad_multiple=4, max_length=6).input_ids.shape == (2, 6)


def test_each_epoch_draws_every_sample_once_with_tasks_mixed():
    split = random_split(60)
    batches = BatchIterator(split, batch_size=6, seed=1, pad_multiple=16)
    assert batches.batches_per_epoch == 10
    epochs = []
    for _ in range(3):
        seen = [int(i) for _ in range(10) for i in next(batches).sample_index]
        assert sorted(seen) == list(range(60))
        epochs.append(seen)
    assert epochs[0] != epochs[1] != epochs[2]
    mixed = [len(set(split.task_ids[batch.sample_index])) for batch in batches.epoch_batches(0)]
    assert max(mixed) > 1


def test_drop_last_leaves_a_different_few_out_each_epoch():
    split = random_split(53)
    batches = BatchIterator(split, batch_size=5, seed=2, pad_multiple=8)
    assert batches.batches_per_epoch == 10
    left_out = []
    for epoch in range(4):
        seen = batches.plan(epoch).ravel()
        assert len(set(seen)) == len(seen) == 50 and seen.min() >= 0
        left_out.append(set(range(53)) - set(seen))
    assert len(set(map(frozenset, left_out))) > 1
    padded = plan_epoch(split.lengths, 5, 2, 0, last_batch="pad")
    assert padded.shape == (11, 5) and sorted(padded.ravel())[:2] == [-1, -1]
    assert sorted(padded[padded >= 0]) == list(range(53))


def test_bucketing_cuts_padding_and_shapes_are_multiples():
    split = random_split(256, seed=3)

    def mean_padding(window):
        batches = BatchIterator(split, batch_size=8, seed=0, pad_multiple=16,
                                sort_window_batches=window)
        fractions = []
        for batch in batches.epoch_batches(0):
            assert batch.input_ids.shape[1] % 16 == 0
            assert batch.input_ids.shape[1] - 16 < split.lengths[batch.sample_index].max()
            fractions.append(batch.padding_fraction)
        return np.mean(fractions)

    assert mean_padding(8) < mean_padding(0) - 0.1


def test_same_seed_same_batches_other_seed_other_batches():
    split = random_split(40)
    first = [b.sample_index for b in BatchIterator(split, batch_size=4, seed=7).epoch_batches(0)]
    again = [b.sample_index for b in BatchIterator(split, batch_size=4, seed=7).epoch_batches(0)]
    other = [b.sample_index for b in BatchIterator(split, batch_size=4, seed=8).epoch_batches(0)]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_resumed_iterator_yields_the_same_batches():
    split = random_split(45)
    uninterrupted = BatchIterator(split, batch_size=4, seed=11, pad_multiple=8)
    reference = [next(uninterrupted) for _ in range(30)]  # 11 batches per epoch: crosses two
    interrupted = BatchIterator(split, batch_size=4, seed=11, pad_multiple=8)
    for _ in range(13):
        next(interrupted)
    saved = json.loads(json.dumps(interrupted.state()))
    assert saved == {"seed": 11, "epoch": 1, "step": 2, "num_samples": 45, "batch_size": 4}
    resumed = BatchIterator(split, batch_size=4, seed=11, pad_multiple=8, state=saved)
    for expected in reference[13:]:
        got = next(resumed)
        for key, value in expected.arrays().items():
            np.testing.assert_array_equal(got.arrays()[key], value)
    assert resumed.state() == uninterrupted.state()


def test_state_from_other_data_is_refused():
    split = random_split(45)
    state = BatchIterator(split, batch_size=4, seed=11).state()
    with pytest.raises(ValueError, match="seed"):
        BatchIterator(split, batch_size=4, seed=12, state=state)
    with pytest.raises(ValueError, match="num_samples"):
        BatchIterator(random_split(44), batch_size=4, seed=11, state=state)
    with pytest.raises(ValueError, match="outside"):
        BatchIterator(split, batch_size=4, seed=11, state={**state, "step": 99})


def test_a_short_last_prompt_batch_is_fitted_to_the_bucket_ladder():
    assert ([fitted_rows(n, 64) for n in (1, 8, 9, 12, 13, 20, 24, 25, 32, 33, 36, 48, 49, 63, 64, 100)]
            == [8, 8, 12, 12, 16, 24, 24, 32, 32, 48, 48, 48, 64, 64, 64, 64])
    assert fitted_rows(3, 6) == 6 and fitted_rows(5, 64, min_rows=1) == 6 and fitted_rows(1, 64, min_rows=1) == 1
    assert fitted_rows(40, 48) == 48 and fitted_rows(100, 48) == 48
    split = make_split(list(range(3, 93)))  # 90 prompts, as a task of the med8 test split
    split = EncodedSplit(split.input_ids, None, split.task_ids, split.sample_ids, PAD, Counter())
    fixed = list(prompt_batches(split, 64, pad_multiple=16))
    fitted = list(prompt_batches(split, 64, pad_multiple=16, fit_last=True))
    assert [len(b.sample_index) for b in fixed] == [64, 64] and [len(b.sample_index) for b in fitted] == [64, 32]
    np.testing.assert_array_equal(fitted[0].input_ids, fixed[0].input_ids)
    # the fitted batch is the fixed one without its last 32 filler rows: same width, same real rows
    np.testing.assert_array_equal(fitted[1].input_ids, fixed[1].input_ids[:32])
    assert list(fitted[1].sample_index) == list(range(64, 90)) + [-1] * 6
    assert (fixed[1].sample_index[32:] == -1).all()


def test_prompt_batches_are_left_padded_in_order():
    split = make_split([2, 5, 3])
    split = EncodedSplit(split.input_ids, None, split.task_ids, split.sample_ids, PAD, Counter())
    batches = list(prompt_batches(split, 2, pad_multiple=4))
    assert [list(b.sample_index) for b in batches] == [[0, 1], [2, -1]]
    np.testing.assert_array_equal(batches[0].input_ids, [[PAD] * 6 + [1000] * 2, [PAD] * 3 + [1001] * 5])
    np.testing.assert_array_equal(batches[1].attention_mask, [[0, 1, 1, 1]] * 2)
    assert batches[0].labels is None and "labels" not in batches[0].arrays()
    with pytest.raises(ValueError, match="need labels"):
        BatchIterator(split, batch_size=2, seed=0)
