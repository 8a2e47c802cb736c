"""The jit generate loop against transformers' generate on a tiny random Llama (float32)."""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from cgc_lora_jax.layers import CGCLoRAConfig
from cgc_lora_jax.models import generate as gen
from cgc_lora_jax.models.llama import LlamaConfig, LlamaForCausalLM, key_map
from conftest import CHATGLM_FIXTURES as CHATGLM, rel_err

VOCAB, PAD, NEW = 256, 0, 8


@functools.cache
def tiny_llama():
    """Seeded random torch Llama (GQA) and the same weights as Flax params."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=PAD,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    cfg = LlamaConfig.from_hf(config.to_dict())
    flat = {}
    for name, (path, transpose) in key_map(cfg).items():
        array = hf.state_dict()[name].numpy()
        flat[path] = jnp.asarray(array.T if transpose else array)
    return hf, LlamaForCausalLM(cfg), traverse_util.unflatten_dict(flat)


def prompts(lengths=(9, 5, 2), seed=3):
    rng = np.random.default_rng(seed)
    t = max(lengths)
    ids = np.full((len(lengths), t), PAD, np.int64)
    mask = np.zeros((len(lengths), t), np.int64)
    for row, n in enumerate(lengths):
        ids[row, t - n :] = rng.integers(3, VOCAB, n)
        mask[row, t - n :] = 1
    return ids, mask


def torch_greedy(ids, mask, eos):
    hf, _, _ = tiny_llama()
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
            max_new_tokens=NEW, min_new_tokens=NEW if eos is None else 0,
            eos_token_id=eos, pad_token_id=PAD,
        )
    new = out[:, ids.shape[1] :].numpy()
    # transformers ends the output once every row is done; ours always has NEW columns.
    return np.pad(new, ((0, 0), (0, NEW - new.shape[1])), constant_values=PAD)


def ours(ids, mask, **kw):
    _, model, params = tiny_llama()
    kw = {"eos_token_id": 2, "pad_token_id": PAD, "max_new_tokens": NEW, **kw}
    return np.asarray(gen.generate(model, params, ids, mask, **kw))


def test_greedy_equals_transformers_left_padded_batch():
    ids, mask = prompts()
    got = ours(ids, mask)
    assert got.shape == (3, NEW)
    np.testing.assert_array_equal(got, torch_greedy(ids, mask, eos=2))


def test_per_row_eos_stop_pads_afterwards():
    ids, mask = prompts()
    free = ours(ids, mask, eos_token_id=None)
    np.testing.assert_array_equal(free, torch_greedy(ids, mask, eos=None))
    eos = int(free[0, 2])  # row 0 emits it at step 2
    expected = free.copy()
    for row in range(3):
        hits = np.flatnonzero(free[row] == eos)
        if hits.size:
            expected[row, hits[0] + 1 :] = PAD
    assert (expected[0, 3:] == PAD).all() and not (expected == free).all()
    unused = min(set(range(3, VOCAB)) - set(free.ravel().tolist()))  # a second eos never emitted
    got = ours(ids, mask, eos_token_id=[eos, unused])
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, torch_greedy(ids, mask, eos=eos))


def test_sampling_degenerate_filters_equal_greedy_and_rng_is_reproducible():
    ids, mask = prompts()
    greedy = ours(ids, mask, eos_token_id=None)
    key = jax.random.key(7)
    kw = dict(do_sample=True, temperature=3.0, eos_token_id=None)  # one compiled program for all
    np.testing.assert_array_equal(ours(ids, mask, top_k=1, rng=key, **kw), greedy)
    np.testing.assert_array_equal(ours(ids, mask, top_p=1e-6, rng=key, **kw), greedy)
    first = ours(ids, mask, rng=key, **kw)
    np.testing.assert_array_equal(ours(ids, mask, rng=key, **kw), first)
    assert not np.array_equal(ours(ids, mask, rng=jax.random.key(8), **kw), first)
    assert not np.array_equal(first, greedy)


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (5, 1.0), (20, 0.5)])
def test_filter_logits_keeps_what_transformers_warpers_keep(top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(4, VOCAB)).astype(np.float32) * 3
    want = torch.from_numpy(logits)
    if top_k:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p < 1.0:
        want = TopPLogitsWarper(top_p)(None, want)
    got = gen.filter_logits(jnp.asarray(logits), jnp.asarray(top_k), jnp.asarray(top_p))
    np.testing.assert_array_equal(np.isfinite(np.asarray(got)), np.isfinite(want.numpy()))


def test_prompt_buckets_waste_at_most_a_third():
    """Each bucket is 2^k or 3 * 2^(k-1), the smallest such >= the length: padding stays under a third of the
    bucket, and consecutive buckets grow by 4/3 or 3/2 (few programs)."""
    lengths = np.arange(1, 5000)
    buckets = np.array([gen.prompt_bucket(int(n)) for n in lengths])
    assert (buckets >= lengths).all() and (buckets >= gen.MIN_PROMPT_BUCKET).all()
    big = lengths > gen.MIN_PROMPT_BUCKET
    assert ((buckets[big] - lengths[big]) < buckets[big] / 3).all()
    ladder = sorted(set(buckets.tolist()))
    assert ladder[:8] == [16, 24, 32, 48, 64, 96, 128, 192]
    for b in ladder:  # a 2^k or 3 * 2^(k-1)
        assert b & (b - 1) == 0 or (b % 3 == 0 and (b // 3) & (b // 3 - 1) == 0)


def test_prompt_lengths_in_one_bucket_share_one_compilation():
    assert [gen.prompt_bucket(n) for n in (1, 5, 16, 17, 32, 33)] == [16, 16, 16, 24, 32, 48]
    ids, mask = prompts(lengths=(5, 3, 1))
    ours(ids, mask)
    compiled = gen._generate._cache_size()
    ids, mask = prompts(lengths=(7, 2, 2))
    ours(ids, mask)
    ours(ids, mask, eos_token_id=5)  # eos ids are traced too
    assert gen._generate._cache_size() == compiled
    ids, mask = prompts(lengths=(20, 4, 1))
    ours(ids, mask)
    assert gen._generate._cache_size() == compiled + 1  # the 32 bucket


def test_extra_left_padding_does_not_change_ids():
    ids, mask = prompts(lengths=(9, 5, 2))
    wide_ids = np.pad(ids, ((0, 0), (10, 0)), constant_values=PAD)  # bucket 32 instead of 16
    wide_mask = np.pad(mask, ((0, 0), (10, 0)))
    np.testing.assert_array_equal(ours(wide_ids, wide_mask), ours(ids, mask))


def test_mixed_task_batch_equals_single_task_batches():
    """task_ids pass through to every decode step: row t of a mixed batch equals row t of an
    all-task-t batch, and the tasks' adapters (random, non-zero B) change the ids."""
    _, base_model, base = tiny_llama()
    lora = CGCLoRAConfig(num_tasks=3, num_common=2, common_rank=2, specific_rank=2, targets="q_proj|v_proj")
    model = LlamaForCausalLM(base_model.config, lora=lora)
    ids, mask = prompts()
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids, mask, np.zeros(3, np.int32))
    flat, base_flat = traverse_util.flatten_dict(shapes["params"]), traverse_util.flatten_dict(base)
    rng = np.random.default_rng(0)
    for path, leaf in flat.items():
        std = {"A": 0.02}.get(path[-1], 1.0)  # adapters and gate random; B non-zero
        noise = jnp.asarray(std * rng.standard_normal(leaf.shape), jnp.float32)
        flat[path] = base_flat.get(path, noise)
    params = traverse_util.unflatten_dict(flat)

    def run(task_ids):
        return np.asarray(gen.generate(model, params, ids, mask, np.asarray(task_ids), max_new_tokens=NEW,
                                       eos_token_id=None, pad_token_id=PAD))

    mixed = run([0, 1, 2])
    per_task = [run([t, t, t]) for t in range(3)]
    for t in range(3):
        np.testing.assert_array_equal(mixed[t], per_task[t][t])
    assert not np.array_equal(per_task[0], per_task[1])
    assert not np.array_equal(per_task[0], ours(ids, mask, eos_token_id=None))




@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_chatglm_families_generate_the_reference_ids(version):
    """The same loop drives ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B through their decode
    contract: greedy ids equal the original PyTorch generate (fixture gen_new_ids)."""
    if not (CHATGLM / version / "reference.npz").is_file():
        pytest.skip(f"{CHATGLM / version} is absent (the shared ChatGLM fixtures)")
    from cgc_lora_jax.models.hf_io import load_pretrained

    ref = np.load(CHATGLM / version / "reference.npz")
    model, params = load_pretrained(CHATGLM / version)
    got = gen.generate(
        model, params, ref["batch_input_ids"], ref["batch_valid_mask"], max_new_tokens=8,
        eos_token_id=int(ref["special_eos_id"]), pad_token_id=int(ref["special_pad_id"]),
    )
    np.testing.assert_array_equal(np.asarray(got), ref["gen_new_ids"])


def test_generate_on_8_devices_equals_one_device():
    """Parameters placed by the llama partition rules on a (data, fsdp, tensor) = (2, 2, 2) mesh
    and the batch split over data x fsdp: the same new ids and the same sampled ids as one device."""
    from jax.sharding import NamedSharding

    from cgc_lora_jax.sharding import BATCH_SPEC, make_mesh, match_partition_rules, named_shardings
    from cgc_lora_jax.models.family import FAMILIES

    _, model, params = tiny_llama()
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = jax.device_put(params, named_shardings(mesh, match_partition_rules(FAMILIES["llama"].partition_rules, params)))
    assert len(sharded["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].sharding.device_set) == 8
    ids, mask = prompts(lengths=(9, 5, 2, 7), seed=5)
    batch = NamedSharding(mesh, BATCH_SPEC)
    ids_s, mask_s = jax.device_put(jnp.asarray(ids), batch), jax.device_put(jnp.asarray(mask), batch)
    kw = dict(eos_token_id=2, pad_token_id=PAD, max_new_tokens=NEW)
    single = gen.generate(model, params, ids, mask, **kw)
    np.testing.assert_array_equal(gen.generate(model, sharded, ids_s, mask_s, **kw), single)
    sample = dict(kw, do_sample=True, temperature=0.8, top_k=20, rng=jax.random.key(1))
    np.testing.assert_array_equal(
        gen.generate(model, sharded, ids_s, mask_s, **sample), gen.generate(model, params, ids, mask, **sample)
    )


def test_bfloat16_cached_decode_matches_the_bfloat16_forward():
    """The cached attention in bf16 (XLA:CPU has no bf16 x bf16 -> f32 kernel for a dot over the
    cache buffer; it used to fail with DotThunk UNIMPLEMENTED): prefill logits equal the plain
    forward's within bf16 rounding, and generation runs."""
    _, model, params = tiny_llama()
    model16 = LlamaForCausalLM(model.config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params16 = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), params)
    ids, mask = prompts()
    forward = jax.jit(model16.apply)({"params": params16}, jnp.asarray(ids), jnp.asarray(mask))[:, -1]
    cache = model16.init_cache(ids.shape[0], ids.shape[1] + NEW)
    prefill = jax.jit(lambda p, ids, mask, cache: model16.apply({"params": p}, ids, mask, None, cache=cache,
                                                                last_only=True, method=model16.decode))
    cached, _ = prefill(params16, jnp.asarray(ids), jnp.asarray(mask), cache)
    assert rel_err(cached[:, -1], forward) < 2e-2
    out = gen.generate(model16, params16, ids, mask, max_new_tokens=NEW, eos_token_id=None, pad_token_id=PAD)
    assert np.asarray(out).shape[0] == ids.shape[0] and np.asarray(out).shape[1] >= NEW


def test_bfloat16_decode_steps_read_what_earlier_steps_wrote():
    """Each bf16 decode step's logits equal the bf16 forward over the prompt and the tokens fed so
    far: the cache writes (bf16 K/V stored through their 16-bit pattern, in place) land in the
    right slots with the right values. A write to the wrong slot, or none, fails this."""
    _, model, params = tiny_llama()
    model16 = LlamaForCausalLM(model.config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params16 = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), params)
    ids, mask = prompts()
    forward = jax.jit(model16.apply)
    decode = jax.jit(lambda p, ids, mask, cache: model16.apply({"params": p}, ids, mask, None, cache=cache,
                                                               last_only=True, method=model16.decode))
    cache = model16.init_cache(ids.shape[0], ids.shape[1] + 4)
    assert cache["layers"][0]["key"].dtype == jnp.bfloat16
    logits, cache = decode(params16, jnp.asarray(ids), jnp.asarray(mask), cache)
    fed_ids, fed_mask = ids, mask
    for _ in range(3):
        token = np.random.default_rng(fed_ids.shape[1]).integers(3, VOCAB, (ids.shape[0], 1))
        fed_ids = np.concatenate([fed_ids, token], axis=1)
        fed_mask = np.concatenate([fed_mask, np.ones_like(token)], axis=1)
        logits, cache = decode(params16, jnp.asarray(token), jnp.ones_like(jnp.asarray(token)), cache)
        reference = forward({"params": params16}, jnp.asarray(fed_ids), jnp.asarray(fed_mask))[:, -1]
        assert cache["layers"][0]["key"].dtype == jnp.bfloat16
        assert rel_err(logits[:, -1], reference) < 2e-2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_greedy_choice_is_the_first_maximum(dtype):
    """greedy_tokens (two plain reductions) picks what np.argmax picks, ties included."""
    rng = np.random.default_rng(0)
    logits = rng.integers(-3, 4, (16, 1000)).astype(np.float32)  # many ties for the maximum
    logits[5] = -np.inf
    logits[6, 999] = 100.0
    logits = jnp.asarray(logits, dtype)
    expected = np.argmax(np.asarray(logits, np.float32), axis=-1)
    np.testing.assert_array_equal(np.asarray(gen.greedy_tokens(logits)), expected)


def answers_and_generate_calls(monkeypatch, lengths, seed, batch_size):
    """(ids, mask, {row: answer}, shapes of the batches generate got) of generate_answers over
    prompts of `lengths`, in batches of `batch_size`."""
    from collections import Counter

    from cgc_lora_jax.data.formatting import EncodedSplit
    from cgc_lora_jax.evaluation.answers import GenerationSettings, generate_answers

    ids, mask = prompts(lengths, seed=seed)
    split = EncodedSplit([row[m.astype(bool)].astype(np.int32) for row, m in zip(ids, mask)], None,
                         np.zeros(len(lengths), np.int32), [str(i) for i in range(len(lengths))], PAD, Counter())
    shapes, real_generate = [], gen.generate
    monkeypatch.setattr(gen, "generate", lambda *a, **k: shapes.append(np.shape(a[2])) or real_generate(*a, **k))
    _, model, params = tiny_llama()
    answers = generate_answers(model, params, split, np.arange(len(lengths)), GenerationSettings(batch_size, NEW, 16),
                               eos_token_id=2)
    return ids, mask, answers, shapes


def test_answers_of_a_short_batch_decode_fitted_rows_and_equal_transformers(monkeypatch):
    """generate_answers fits a short batch (5 prompts, batch size 64) to 8 rows; every answer is
    still transformers' greedy answer, cut at eos."""
    from cgc_lora_jax.evaluation.answers import cut_at_stop

    lengths = (9, 5, 2, 7, 4)
    ids, mask, answers, shapes = answers_and_generate_calls(monkeypatch, lengths, seed=5, batch_size=64)
    assert [rows for rows, _ in shapes] == [8]
    want = torch_greedy(ids, mask, eos=2)
    assert [answers[i] for i in range(len(lengths))] == [cut_at_stop(row, [2]) for row in want]


def test_answers_batch_prompts_of_similar_length_and_keep_each_answer_with_its_prompt(monkeypatch):
    """Prompts in the order short, long, short, long ... go to generate sorted by length, so each
    batch is as narrow as its own prompts (two 16-wide batches and two wider ones, not four wide
    ones); every answer is still transformers' greedy answer of its own prompt."""
    from cgc_lora_jax.evaluation.answers import cut_at_stop

    lengths = (3, 30, 5, 28, 4, 31, 6, 29, 2, 27, 7, 26, 3, 25, 8, 24)
    ids, mask, answers, shapes = answers_and_generate_calls(monkeypatch, lengths, seed=6, batch_size=4)
    assert [width for _, width in shapes] == [16, 16, 32, 32]
    want = torch_greedy(ids, mask, eos=2)
    assert [answers[i] for i in range(len(lengths))] == [cut_at_stop(row, [2]) for row in want]
