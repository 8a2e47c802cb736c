"""Packed rows: every sample once, one task per row, and the packed loss == the samples' own losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cgc_lora_jax.loss import IGNORE
from cgc_lora_jax.layers import CGCLoRAConfig
from cgc_lora_jax.data.packing import pack_lengths, packed_arrays, segment_mask, segment_positions
from cgc_lora_jax.params import join_params, split_params
from cgc_lora_jax.loss import token_losses
from cgc_lora_jax.training.step import example_sums
from cgc_lora_jax.models.llama import LlamaConfig, LlamaForCausalLM

V, ROW = 40, 24


def random_samples(n=9, seed=0):
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        length = int(rng.integers(3, 13))
        ids = rng.integers(1, V, length)
        labels = np.where(np.arange(length) >= int(rng.integers(1, length)), ids, IGNORE)
        samples.append({"input_ids": ids, "labels": labels, "task_id": i % 2})
    return samples


def test_rows_hold_every_sample_once_within_the_row_length_and_one_task():
    lengths = [5, 17, 3, 9, 24, 1, 8, 8, 12, 2]
    tasks = [0, 1, 0, 1, 0, 0, 1, 1, 0, 1]
    rows = pack_lengths(lengths, tasks, ROW)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= ROW for row in rows)
    assert all(len({tasks[i] for i in row}) == 1 for row in rows)
    assert len(rows) == 5  # first-fit decreasing: task 0 [24] [12 5 3 1]; task 1 [17 2] [9 8] [8]
    with pytest.raises(ValueError, match="sample 1 has 30 tokens > row_length 24"):
        pack_lengths([3, 30], [0, 0], ROW)


def test_segment_positions_and_mask():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0], [1, 2, 2, 2, 3, 3]])
    np.testing.assert_array_equal(segment_positions(seg), [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 0, 1]])
    mask = np.asarray(segment_mask(seg))
    want = np.zeros((2, 6, 6), bool)
    for b in range(2):
        for i in range(6):
            for j in range(i + 1):
                want[b, i, j] = seg[b, i] == seg[b, j] != 0
    np.testing.assert_array_equal(mask, want)


def test_packed_loss_equals_the_sum_of_per_sample_losses():
    cfg = LlamaConfig.from_hf(dict(model_type="llama", vocab_size=V, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   rms_norm_eps=1e-5, tie_word_embeddings=True))
    model = LlamaForCausalLM(cfg, lora=CGCLoRAConfig(2, num_common=2, common_rank=2, specific_rank=2,
                                                     targets="q_proj|v_proj|up_proj"))
    params = model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32), None, jnp.zeros(1, jnp.int32))["params"]
    params = traverse_util.unflatten_dict({p: jax.random.normal(jax.random.key(len(p)), x.shape) * 0.1
                                           if p[-1] == "B" else x for p, x in traverse_util.flatten_dict(params).items()})
    base, adapters = split_params(params)
    samples = random_samples()
    rows = pack_lengths([len(s["input_ids"]) for s in samples], [s["task_id"] for s in samples], ROW)
    assert len(rows) < len(samples)  # something was packed
    packed = {k: jnp.asarray(v) for k, v in packed_arrays(samples, rows, ROW, pad_token_id=0).items()}

    def packed_loss(adapters):
        per_row, counts = example_sums(model, join_params(base, adapters), packed, None, True)
        return per_row.sum(), (per_row, counts)

    (total, (per_row, counts)), grads = jax.jit(jax.value_and_grad(packed_loss, has_aux=True))(adapters)

    # Reference: each sample alone in its own row of an ordinary left-padded batch (mask-derived
    # positions and attention, full logits): the unpacked path.
    longest = max(len(s["input_ids"]) for s in samples)
    ids = np.zeros((len(samples), longest), np.int32)
    labels = np.full((len(samples), longest), IGNORE, np.int32)
    mask = np.zeros((len(samples), longest), np.int32)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, longest - n:], labels[i, longest - n:], mask[i, longest - n:] = s["input_ids"], s["labels"], 1

    def alone_loss(adapters):
        logits = model.apply({"params": join_params(base, adapters)}, jnp.asarray(ids), jnp.asarray(mask),
                             jnp.asarray([s["task_id"] for s in samples]))
        nll, counted = token_losses(logits, jnp.asarray(labels))
        return nll.sum(), (nll.sum(axis=1), counted.sum(axis=1))

    (want_total, (alone, alone_counts)), want_grads = jax.jit(jax.value_and_grad(alone_loss, has_aux=True))(adapters)
    for row, members in enumerate(rows):
        np.testing.assert_allclose(per_row[row], sum(float(alone[i]) for i in members), rtol=1e-5)
        assert int(counts[row]) == sum(int(alone_counts[i]) for i in members)
    np.testing.assert_allclose(total, want_total, rtol=1e-5)
    for path, g in traverse_util.flatten_dict(grads).items():
        w = np.asarray(traverse_util.flatten_dict(want_grads)[path])
        assert np.abs(np.asarray(g) - w).max() <= 1e-5 * max(np.abs(w).max(), 1e-6), path
