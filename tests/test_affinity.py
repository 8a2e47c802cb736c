"""cgc_lora_jax/multitask/affinity.py: lookahead affinity on a toy CGC-LoRA regression with two conflicting
task groups, the partition search against brute force, and the command on the built-in demo."""

import itertools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cgc_lora_jax.cli import affinity as affinity_cli
from cgc_lora_jax.multitask import affinity as cluster
from cgc_lora_jax.multitask.clusters import parse_clusters
from cgc_lora_jax.layers import CGCLoRAConfig, Dense, TaskRouting
from cgc_lora_jax.params import join_params, split_params

D_IN, D_OUT, BATCH = 8, 4, 16
GROUP_SIGN = np.array([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])  # tasks 0-2: y = x W; tasks 3-5: y = -x W
LORA = CGCLoRAConfig(num_tasks=6, num_common=2, common_rank=2, specific_rank=1, alpha=4.0,
                     task_embed_dim=4, init_std=0.5)


class ToyRegressor(nn.Module):
    """One CGC-LoRA Dense over a frozen zero kernel: the adapters alone fit the targets."""

    lora: CGCLoRAConfig

    @nn.compact
    def __call__(self, x, task_ids):
        adapters = TaskRouting(self.lora, name="task_gate")(task_ids, x.shape[0])
        return Dense(D_OUT, use_bias=False, lora=self.lora, kernel_init=nn.initializers.zeros, name="proj")(x, adapters)


MODEL = ToyRegressor(LORA)


def loss_fn(adapters, base, batch):
    pred = MODEL.apply({"params": join_params(base, adapters)}, batch["x"], batch["task_ids"])
    return jnp.mean((pred - batch["y"]) ** 2)


def toy_batches(seed: int):
    """Per step and task [6, B, ...]: x ~ N(0, I), y = sign(group) * x (W + small task noise)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((D_IN, D_OUT))
    task_w = GROUP_SIGN[:, None, None] * w + 0.1 * rng.standard_normal((6, D_IN, D_OUT))
    while True:
        x = rng.standard_normal((6, BATCH, D_IN)).astype(np.float32)
        yield {"x": x, "y": np.einsum("tbi,tio->tbo", x, task_w).astype(np.float32),
               "task_ids": np.repeat(np.arange(6, dtype=np.int32)[:, None], BATCH, axis=1)}


def toy_params():
    params = MODEL.init(jax.random.key(0), jnp.zeros((1, D_IN)), jnp.zeros((1,), jnp.int32))["params"]
    return split_params(params)


def test_lookahead_affinity_is_the_definition():
    """Z_t(i -> j) = 1 - L_j(after one step on task i) / L_j(before), computed task by task."""
    base, adapters = toy_params()
    tx = optax.adam(0.05)
    batches = next(toy_batches(1))
    # a joint step first, so that B is non-zero and every parameter has a gradient
    adapters, _ = jax.jit(cluster.make_joint_step(loss_fn, tx))(adapters, tx.init(adapters), base, batches)
    z, before = jax.jit(cluster.make_affinity_step(loss_fn, tx))(adapters, base, batches)
    task = lambda t: jax.tree.map(lambda a: a[t], batches)  # noqa: E731
    loss = jax.jit(loss_fn)

    @jax.jit
    def step_on(batch):  # one Adam step from a fresh state on one task's batch
        updates, _ = tx.update(jax.grad(loss_fn)(adapters, base, batch), tx.init(adapters), adapters)
        return optax.apply_updates(adapters, updates)

    for i in range(6):
        stepped = step_on(task(i))
        for j in range(6):
            want = 1.0 - loss(stepped, base, task(j)) / loss(adapters, base, task(j))
            np.testing.assert_allclose(z[i, j], want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(before, [loss(adapters, base, task(j)) for j in range(6)], rtol=1e-6)


@pytest.mark.parametrize("lookahead, lr", [("adam", 0.05), ("sgd", 0.5)])
def test_affinity_separates_conflicting_groups_and_grouping_recovers_them(lookahead, lr):
    base, adapters = toy_params()
    lookahead_tx = cluster.lookahead_optimizer(lookahead, lr)
    z = cluster.warmup_affinity(loss_fn, optax.adam(0.05), lookahead_tx, adapters, base, toy_batches(0), steps=5)
    same = GROUP_SIGN[:, None] == GROUP_SIGN[None, :]
    off_diagonal = ~np.eye(6, dtype=bool)
    within, across = z[same & off_diagonal], z[~same]
    assert within.min() > 0.0 > across.max(), cluster.format_matrix(z, [f"t{i}" for i in range(6)])
    assert cluster.best_partition(z, 2) == [[0, 1, 2], [3, 4, 5]]
    assert cluster.best_partition(z, 2, max_exhaustive=0) == [[0, 1, 2], [3, 4, 5]]  # local search too


def test_partitions_enumerate_each_grouping_once():
    assert [cluster.stirling2(8, k) for k in range(1, 9)] == [1, 127, 966, 1701, 1050, 266, 28, 1]
    assert cluster.stirling2(10, 5) == 42525
    for n, k in [(5, 2), (6, 3), (7, 4)]:
        found = list(cluster.partitions(n, k))
        assert len(found) == cluster.stirling2(n, k)
        canonical = {frozenset(frozenset(i for i in range(n) if lab[i] == g) for g in range(k)) for lab in found}
        assert len(canonical) == len(found)
        assert all(sorted(set(lab)) == list(range(k)) for lab in found)


def hand_made_affinity(blocks, n, seed=0):
    """Within a block +0.5, across -0.2, plus asymmetric noise of 0.15."""
    rng = np.random.default_rng(seed)
    label = {t: b for b, block in enumerate(blocks) for t in block}
    z = np.array([[0.5 if label[i] == label[j] else -0.2 for j in range(n)] for i in range(n)])
    return z + 0.15 * rng.standard_normal((n, n))


def test_partition_search_matches_brute_force():
    blocks = [[0, 3, 6], [1, 4], [2, 5]]
    z = hand_made_affinity(blocks, 7)
    assert cluster.best_partition(z, 3) == blocks
    # brute force over all 3^7 labelings with 3 non-empty clusters
    best = max((cluster.partition_score(z, lab), lab) for lab in itertools.product(range(3), repeat=7)
               if len(set(lab)) == 3)
    assert cluster.partition_score(z, cluster.labels_of(cluster.best_partition(z, 3), 7)) == pytest.approx(best[0])
    # a trap for greedy pairing: 0->1 is the single largest entry, yet {0, 1} loses overall
    trap = np.array([[0, 3.0, -2, -2], [0, 0, 1, 1], [-2, 1, 0, 1], [-2, 1, 1, 0]], float)
    assert cluster.best_partition(trap, 2) == [[0], [1, 2, 3]]
    # above the exhaustive limit (S(14, 3) = 797,147) the local search still finds clear blocks
    big_blocks = [[0, 3, 6, 9, 12], [1, 4, 7, 10, 13], [2, 5, 8, 11]]
    assert cluster.stirling2(14, 3) > cluster.MAX_EXHAUSTIVE
    assert cluster.best_partition(hand_made_affinity(big_blocks, 14), 3) == big_blocks


def test_command_on_the_demo_prints_matrix_heatmap_and_clusters(tmp_path, capsys):
    assert affinity_cli.main(["--config", "demo_tiny", "--k", "2", "--steps", "1", "--batch-per-task", "2",
                         "--workdir", str(tmp_path), "--config.data.pad_multiple=128"]) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "affinity.json").read_text())
    z = np.asarray(saved["affinity"])
    assert z.shape == (3, 3) and np.all(np.isfinite(z)) and np.any(z != 0)
    assert (tmp_path / "affinity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    snippet = next(line for line in out.splitlines() if "c.data.clusters" in line).split('"')[1]
    clusters = parse_clusters(snippet)
    assert len(clusters) == 2 and sorted(t for ts in clusters.values() for t in ts) == sorted(saved["tasks"])
    best = cluster.best_partition(z, 2)
    assert sorted(sorted(ts) for ts in clusters.values()) == sorted(sorted(saved["tasks"][i] for i in g) for g in best)
