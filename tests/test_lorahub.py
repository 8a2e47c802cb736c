"""LoRAHub: source LoRAs of a LoRA Single tree, factor-wise composition, the L1 objective, and the
gradient-free search finding the source that explains the few-shot data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgc_lora_jax.layers import CGCLoRAConfig
from cgc_lora_jax.evaluation.lorahub import (DEFAULT_ALPHA, WEIGHT_BOUND, compose, few_shot_loss_fn, l1_penalty,
                                  learn_weights, merge_composed, source_loras)
from cgc_lora_jax.merge import merge_task
from cgc_lora_jax.params import split_params
from cgc_lora_jax.models import chatglm

NUM_TASKS, RANK = 3, 4
GMASK, SOP = 3, 4


def tiny_config() -> chatglm.ChatGLMConfig:
    return chatglm.ChatGLMConfig(
        vocab_size=48, hidden_size=32, num_layers=2, num_attention_heads=4, inner_hidden_size=64,
        layernorm_epsilon=1e-5, max_sequence_length=64, bos_token_id=SOP, eos_token_id=5, mask_token_id=2,
        gmask_token_id=GMASK, pad_token_id=1, position_encoding_2d=True)


@pytest.fixture(scope="module")
def single_run():
    """A LoRA Single model (one rank-4 LoRA per task, A and B of std 0.3) and word embeddings of
    std 0.3 (not 0.02), so its next-token distributions are peaked, as a trained model's are, and
    each task's LoRA moves them."""
    lora = CGCLoRAConfig.lora_single(NUM_TASKS, rank=RANK, targets="query_key_value|dense_h_to_4h|dense_4h_to_h")
    model = chatglm.build(tiny_config(), lora=lora)
    ids = jnp.asarray([[7, 8, GMASK, SOP, 9]], jnp.int32)
    params = model.init(jax.random.key(0), ids, None, jnp.zeros((1,), jnp.int32))["params"]
    keys = iter(jax.random.split(jax.random.key(1), 64))

    def perturb(path, leaf):
        names = [p.key for p in path]
        if names[-1] in ("A", "B"):
            return 0.3 * jax.random.normal(next(keys), leaf.shape, leaf.dtype)
        return 0.3 * leaf / jnp.std(leaf) if names[-1] == "embedding" else leaf

    params = jax.tree_util.tree_map_with_path(perturb, params)
    return model, params, lora


def _layer(params, path):
    for key in path.split("/"):
        params = params[key]
    return params


def test_sources_are_each_tasks_own_columns_and_compose_is_the_weighted_sum(single_run):
    _, params, lora = single_run
    sources = source_loras(params, lora)
    assert sorted(sources) == sorted(
        f"transformer/layers_{i}/{name}" for i in range(2)
        for name in ("attention/query_key_value", "mlp/dense_h_to_4h", "mlp/dense_4h_to_h"))
    weights = np.array([0.7, -1.2, 0.4])
    for path, (a_hub, b_hub) in compose(sources, weights).items():
        a = np.asarray(_layer(params, path)["lora"]["A"], np.float64)
        b = np.asarray(_layer(params, path)["lora"]["B"], np.float64)
        cols = [slice(i * RANK, (i + 1) * RANK) for i in range(NUM_TASKS)]
        want_a = sum(w * a[:, c] for w, c in zip(weights, cols))
        want_b = sum(w * b[c, :] for w, c in zip(weights, cols))
        np.testing.assert_allclose(a_hub, want_a, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(b_hub, want_b, rtol=1e-6, atol=1e-7)


def test_one_hot_weights_give_the_tasks_own_merged_model(single_run):
    _, params, lora = single_run
    base = split_params(params)[0]
    sources = source_loras(params, lora)
    for task in range(NUM_TASKS):
        composed = merge_composed(base, compose(sources, np.eye(NUM_TASKS)[task]), lora.scaling)
        merged = merge_task(params, task, lora)
        assert jax.tree.structure(composed) == jax.tree.structure(merged)
        for got, want in zip(jax.tree.leaves(composed), jax.tree.leaves(merged)):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)  # float32 kernels ~1: 1e-6 is a few ulps


def test_sources_need_a_lora_single_layout(single_run):
    _, params, _ = single_run
    with pytest.raises(ValueError, match="LoRA Single run"):
        source_loras(params, CGCLoRAConfig(NUM_TASKS, num_common=2, common_rank=2, specific_rank=2))


def test_objective_is_the_originals_mean_l1():
    assert l1_penalty([0.5, -1.0, 0.0, 1.5], 0.05) == pytest.approx(0.05 * 3.0 / 4)
    assert DEFAULT_ALPHA == 0.05 and WEIGHT_BOUND == 1.5


def test_search_is_seeded_bounded_and_spends_the_budget():
    target = np.array([0.0, 1.0, -0.5, 0.0])
    loss = lambda w: float(np.sum((np.asarray(w) - target) ** 2))
    w1, history = learn_weights(loss, 4, budget=60, alpha=0.0, seed=3)
    w2, _ = learn_weights(loss, 4, budget=60, alpha=0.0, seed=3)
    np.testing.assert_array_equal(w1, w2)
    assert len(history) == 60
    assert all(np.all(np.abs(w) <= WEIGHT_BOUND) for w, _ in history)
    np.testing.assert_allclose(w1, target, atol=0.1)


def test_search_puts_most_weight_on_the_source_that_made_the_data(single_run):
    """Few-shot labels are task 1's own greedy tokens: composing task 1's LoRA alone explains them."""
    model, params, lora = single_run
    plain = model.clone(lora=None)
    base = split_params(params)[0]
    rng = np.random.default_rng(0)
    prompt = rng.integers(6, 48, size=(6, 8))
    input_ids = np.concatenate([prompt, np.full((6, 1), GMASK), np.full((6, 1), SOP), rng.integers(6, 48, size=(6, 8))], 1)
    logits = plain.apply({"params": merge_task(params, 1, lora)}, jnp.asarray(input_ids, jnp.int32), None, None)
    labels = np.full(input_ids.shape, -100)
    labels[:, 10:] = np.asarray(jnp.argmax(logits, -1))[:, 9:-1]  # position j + 1 <- argmax at j
    batch = {"input_ids": input_ids.astype(np.int32), "labels": labels.astype(np.int32)}

    loss = few_shot_loss_fn(plain, base, source_loras(params, lora), lora.scaling, batch)
    losses = [loss(w) for w in np.eye(NUM_TASKS)]
    assert np.argmin(losses) == 1, losses
    weights, history = learn_weights(loss, NUM_TASKS, budget=80, alpha=DEFAULT_ALPHA, seed=0)
    assert np.argmax(np.abs(weights)) == 1, weights
    assert abs(weights[1]) > 0.5, weights
    assert loss(weights) < loss(np.zeros(NUM_TASKS))
    # the loss of the composed model is the loss of sum_i w_i (A_i, B_i) merged by hand
    by_hand = {}
    for path in source_loras(params, lora):
        layer = _layer(params, path)["lora"]
        a = sum(w * layer["A"][:, i * RANK:(i + 1) * RANK] for i, w in enumerate(weights))
        b = sum(w * layer["B"][i * RANK:(i + 1) * RANK] for i, w in enumerate(weights))
        by_hand[path] = (a, b)
    hand_params = merge_composed(base, by_hand, lora.scaling)
    hand_logits = plain.apply({"params": hand_params}, jnp.asarray(batch["input_ids"]), None, None)
    from cgc_lora_jax.loss import token_losses

    nll, mask = token_losses(hand_logits, jnp.asarray(batch["labels"]))
    assert loss(weights) == pytest.approx(float(nll.sum() / mask.sum()), rel=1e-5)


def test_eval_lorahub_on_a_lora_single_run_writes_weights_predictions_and_scores(tmp_path):
    """`eval.py lorahub` end to end on a 5-step LoRA Single demo run (4 test prompts per task)."""
    import json

    from cgc_lora_jax.cli import eval as eval_cli
    from cgc_lora_jax.config import load_config
    from cgc_lora_jax.scoring import score_files
    from cgc_lora_jax.training.loop import train

    run = tmp_path / "lora_single"
    train(load_config("demo_tiny", [
        "lora.num_common=0", "lora.common_rank=0", "lora.specific_rank=4", "lora.gate=uniform",
        "train.steps=5", "train.batch_size=8", "train.eval_every=0", "train.checkpoint_every=5", "mesh.data=1",
        "data.max_eval_per_task=4", "eval.max_new_tokens=4"]), run)
    assert eval_cli.main(["lorahub", "--workdir", str(run), "--shots", "3", "--budget", "12"]) == 0

    out = run / "lorahub"
    hub = json.loads((out / "lorahub.json").read_text())
    tasks = json.loads((run / "task_vocab.json").read_text())["tasks"]
    train_records = {r["sample_id"]: r for r in map(json.loads, (run / "data" / "train.json").read_text().splitlines())}
    assert sorted(hub["tasks"]) == sorted(tasks)
    for task, result in hub["tasks"].items():
        assert result["sources"] == tasks  # every task's LoRA, the target's own included
        assert len(result["weights"]) == len(tasks) and max(map(abs, result["weights"])) <= WEIGHT_BOUND
        assert len(result["shots"]) == 3 and all(train_records[s]["task_dataset"] == task for s in result["shots"])
        assert result["objective"] == pytest.approx(result["few_shot_loss"] + l1_penalty(result["weights"], 0.05))

    predictions = [json.loads(line) for line in (out / "predictions_test.jsonl").read_text().splitlines()]
    gold = {r["sample_id"]: r for r in map(json.loads, (run / "data" / "test.json").read_text().splitlines())}
    assert len(predictions) == 4 * len(tasks)
    for pred in predictions:
        assert {k: v for k, v in pred.items() if k != "target"} == {k: v for k, v in gold[pred["sample_id"]].items() if k != "target"}
    gold_path = tmp_path / "gold.jsonl"
    gold_path.write_text("".join(json.dumps(gold[p["sample_id"]], ensure_ascii=False) + "\n" for p in predictions))
    assert json.loads((out / "scores_test.json").read_text()) == score_files(out / "predictions_test.jsonl", gold_path,
                                                                             benchmark="demo")
    assert (out / "scores_test.png").is_file() and (out / "scores_test.md").is_file()
