"""Which tasks should share a CGC-LoRA module set: inter-task affinity and the grouping into K
clusters for the 1+N pattern (Fifty et al. 2021, "Efficiently Identifying Task Groupings for
Multi-Task Learning").

Lookahead affinity of task i onto task j at warm-up step t, with theta_t the trainable parameters
(the adapters and gate):

    theta_{t|i} = theta_t after one optimizer step on task i's batch alone, from a fresh
                  optimizer state (the step is discarded)
    Z_t(i -> j) = 1 - L_j(X_j^t, theta_{t|i}) / L_j(X_j^t, theta_t)

Z > 0: a step for task i also lowers task j's loss; Z < 0: it raises it. The warm-up is ordinary
multi-task training (each step updates theta on the mean of the T task losses) and Z is the mean
of Z_t over its steps. One step costs T gradients and T * (T + 1) forwards. The lookahead step
is the paper's SGD step theta_t - eta grad L_i ("sgd") or the run's Adam step from a fresh state,
lr * g / |g| per parameter at the first step ("adam", the default: the scale of training's own
first steps, whatever the gradients' scale).

Grouping: the partition of the tasks into K non-empty clusters with the largest total
within-cluster affinity

    score(C_1, ..., C_K) = sum_k sum_{i != j in C_k} Z(i -> j)

found by exhaustive search over all S(n, K) partitions (Stirling number of the second kind) when
S(n, K) <= MAX_EXHAUSTIVE, which covers every K for n <= 10 tasks (S(10, 5) = 42,525); above
that, by local search: from seeded random partitions, move one task to another cluster while the
score rises, and keep the best of `restarts` runs (not guaranteed optimal).

    python -m cgc_lora_jax affinity --config promptcblue --k 3 --steps 20 [--config.x=y ...]

prints the matrix, writes WORKDIR/affinity.json and affinity.png, and prints the clusters as the
`--clusters` argument of `python -m cgc_lora_jax clusters train`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

MAX_EXHAUSTIVE = 200_000  # most partitions scored one by one; above this, local search
RESTARTS = 64  # local-search restarts above MAX_EXHAUSTIVE

# loss_fn(trainable, frozen, batch) -> scalar loss of one task's batch
LossFn = Callable[[object, object, object], jax.Array]


def make_affinity_step(loss_fn: LossFn, lookahead_tx: optax.GradientTransformation):
    """(trainable, frozen, task_batches) -> (Z_t [T, T], losses [T]); task_batches is a pytree
    whose leaves have a leading task axis T (row i: task i's batch). Each lookahead is one step of
    `lookahead_tx` from a fresh optimizer state."""

    def task_losses(trainable, frozen, task_batches):
        return jax.lax.map(lambda batch: loss_fn(trainable, frozen, batch), task_batches)

    def affinity_step(trainable, frozen, task_batches):
        before = task_losses(trainable, frozen, task_batches)

        def lookahead(batch_i):
            grads = jax.grad(loss_fn)(trainable, frozen, batch_i)
            updates, _ = lookahead_tx.update(grads, lookahead_tx.init(trainable), trainable)
            return task_losses(optax.apply_updates(trainable, updates), frozen, task_batches)

        after = jax.lax.map(lookahead, task_batches)  # [i, j]: L_j after a step on task i
        return 1.0 - after / before[None, :], before

    return affinity_step


def make_joint_step(loss_fn: LossFn, tx: optax.GradientTransformation):
    """One multi-task training step on the mean of the task losses."""

    def joint_step(trainable, opt_state, frozen, task_batches):
        def mean_loss(params):
            return jnp.mean(jax.lax.map(lambda batch: loss_fn(params, frozen, batch), task_batches))

        grads = jax.grad(mean_loss)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    return joint_step


def warmup_affinity(loss_fn: LossFn, tx, lookahead_tx, trainable, frozen, task_batches: Iterator,
                    steps: int) -> np.ndarray:
    """Mean lookahead affinity Z [T, T] over `steps` warm-up steps of training with `tx`.

    The lookahead steps use `lookahead_tx` from a fresh state: with the training optimizer's own
    state, Adam's momentum (from the joint steps) dominates every lookahead and makes all tasks
    look alike."""
    affinity_step = jax.jit(make_affinity_step(loss_fn, lookahead_tx))
    joint_step = jax.jit(make_joint_step(loss_fn, tx))
    opt_state = tx.init(trainable)
    total = None
    for _ in range(steps):
        batches = next(task_batches)
        z, _ = affinity_step(trainable, frozen, batches)
        total = z if total is None else total + z
        trainable, opt_state = joint_step(trainable, opt_state, frozen, batches)
    return np.asarray(total, np.float64) / steps


# --- Grouping -------------------------------------------------------------------------------


def stirling2(n: int, k: int) -> int:
    """S(n, k): the number of partitions of n items into k non-empty groups."""
    row = [1] + [0] * k  # S(0, j)
    for m in range(1, n + 1):
        row = [0] + [j * row[j] + row[j - 1] for j in range(1, k + 1)]
    return row[k]


def partitions(n: int, k: int) -> Iterator[list[int]]:
    """Every partition of range(n) into exactly k groups, once each, as labels (restricted growth
    strings: item 0 in group 0, each item in a used group or the next new one)."""
    labels = [0] * n

    def extend(i, used):
        if n - i < k - used:
            return
        if i == n:
            yield list(labels)
            return
        for g in range(min(used + 1, k)):
            labels[i] = g
            yield from extend(i + 1, max(used, g + 1))

    if 1 <= k <= n:
        yield from extend(1, 1)


def labels_of(groups: list[list[int]], n: int) -> list[int]:
    """Cluster index of each of the n tasks."""
    return [next(c for c, group in enumerate(groups) if i in group) for i in range(n)]


def partition_score(affinity: np.ndarray, labels) -> float:
    """sum over ordered pairs i != j in the same cluster of Z(i -> j)."""
    labels = np.asarray(labels)
    same = labels[:, None] == labels[None, :]
    np.fill_diagonal(same, False)
    return float(np.sum(np.where(same, affinity, 0.0)))


def _local_search(affinity: np.ndarray, k: int, restarts: int, seed: int) -> np.ndarray:
    """Best labels of `restarts` hill climbs that move one task at a time to the cluster where
    its pair affinities Z(i -> j) + Z(j -> i) with the members sum highest."""
    n, rng = len(affinity), np.random.default_rng(seed)
    pair = affinity + affinity.T
    best, best_score = None, -np.inf
    for _ in range(restarts):
        labels = rng.permutation(np.arange(n) % k)  # every cluster non-empty
        improved = True
        while improved:
            improved = False
            for i in rng.permutation(n):
                sizes = np.bincount(labels, minlength=k)
                if sizes[labels[i]] == 1:
                    continue  # moving it would empty its cluster
                gain = np.array([pair[i, labels == g].sum() - pair[i, i] * (labels[i] == g) for g in range(k)])
                target = int(np.argmax(gain))
                if gain[target] > gain[labels[i]] + 1e-12:
                    labels[i], improved = target, True
        score = partition_score(affinity, labels)
        if score > best_score:
            best, best_score = labels.copy(), score
    return best


def best_partition(affinity, k: int, *, max_exhaustive: int = MAX_EXHAUSTIVE, restarts: int = RESTARTS,
                   seed: int = 0) -> list[list[int]]:
    """The K clusters (lists of task indices, ordered by their first task) with the largest total
    within-cluster affinity; exhaustive up to `max_exhaustive` partitions, else local search."""
    affinity = np.asarray(affinity, np.float64)
    n = len(affinity)
    if affinity.shape != (n, n) or not 1 <= k <= n:
        raise ValueError(f"need a square affinity matrix and 1 <= k <= {n}, got {affinity.shape} and k={k}")
    if stirling2(n, k) <= max_exhaustive:
        best = max(partitions(n, k), key=lambda labels: partition_score(affinity, labels))
    else:
        best = _local_search(affinity, k, restarts, seed)
    groups: dict[int, list[int]] = {}
    for task, label in enumerate(best):
        groups.setdefault(int(label), []).append(task)
    return sorted(groups.values())


# --- A run's tasks --------------------------------------------------------------------------


def task_batches(split, num_tasks: int, batch_per_task: int, seed: int, pad_multiple: int) -> Iterator[dict]:
    """Endless {input_ids, labels, task_ids} with a leading task axis [T, B, W]: each step draws
    batch_per_task samples of every task (with replacement only if a task has fewer)."""
    from cgc_lora_jax.data.batching import make_batch

    rows = [np.flatnonzero(split.task_ids == t) for t in range(num_tasks)]
    empty = [t for t, r in enumerate(rows) if len(r) == 0]
    if empty:
        raise ValueError(f"task IDs {empty} have no training sample")
    rng = np.random.default_rng(seed)
    while True:
        picks = [rng.choice(r, batch_per_task, replace=len(r) < batch_per_task) for r in rows]
        batch = make_batch(split, np.concatenate(picks), pad_multiple=pad_multiple).arrays()
        yield {k: batch[k].reshape((num_tasks, batch_per_task) + batch[k].shape[1:])
               for k in ("input_ids", "labels", "task_ids")}


def lm_loss(model) -> LossFn:
    """Token-mean cross-entropy of one task's batch, adapters trainable, base frozen, no dropout."""
    from cgc_lora_jax.params import join_params
    from cgc_lora_jax.loss import token_losses

    def loss_fn(adapters, base, batch):
        logits = model.apply({"params": join_params(base, adapters)}, batch["input_ids"], None, batch["task_ids"])
        nll, mask = token_losses(logits, batch["labels"])
        return nll.sum() / jnp.maximum(mask.sum(), 1)

    return loss_fn


def lookahead_optimizer(kind: str, lr: float) -> optax.GradientTransformation:
    """The lookahead step: "sgd" (theta - lr * grad) or "adam" (from a fresh state)."""
    if kind not in ("sgd", "adam"):
        raise ValueError(f"lookahead {kind!r}: expected 'sgd' or 'adam'")
    return optax.sgd(lr) if kind == "sgd" else optax.adam(lr)


def run_affinity(cfg, workdir: str | Path, steps: int, batch_per_task: int, lookahead: str = "adam",
                 lookahead_lr: float | None = None) -> tuple[np.ndarray, list[str]]:
    """(mean lookahead affinity [T, T], task names) of a short warm-up of `cfg`'s training.

    Training and lookahead use the run's peak learning rate, constant (the run's warm-up schedule
    would start at learning rate 0), unless `lookahead_lr` is given."""
    from cgc_lora_jax.params import split_params
    from cgc_lora_jax.run import encode, load_base, lora_config, read_data

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    splits, vocab = read_data(cfg.data, workdir, seed=cfg.train.seed, splits=("train",))
    lora = lora_config(cfg.lora, len(vocab.tasks))
    base = load_base(cfg.model, lora=lora, workdir=workdir, seed=cfg.train.seed)
    train = encode(cfg.data, splits.datasets["train"], base, vocab)
    frozen, adapters = split_params(base.params)
    tx = optax.chain(*([optax.clip_by_global_norm(cfg.train.grad_clip)] if cfg.train.grad_clip > 0 else []),
                     optax.adamw(cfg.train.lr, weight_decay=cfg.train.weight_decay))
    lookahead_tx = lookahead_optimizer(lookahead, lookahead_lr or cfg.train.lr)
    batches = task_batches(train, len(vocab.tasks), batch_per_task, cfg.train.seed, cfg.data.pad_multiple)
    z = warmup_affinity(lm_loss(base.model), tx, lookahead_tx, adapters, frozen, batches, steps)
    return z, list(vocab.tasks)


def format_matrix(affinity: np.ndarray, tasks: list[str]) -> str:
    """The matrix as text: row i = the step's task i, column j = the task whose loss is measured."""
    width = max(8, *(len(t) for t in tasks))
    lines = [" " * width + " " + " ".join(f"{t[:8]:>8}" for t in tasks)]
    lines += [f"{t:>{width}} " + " ".join(f"{v:8.4f}" for v in row) for t, row in zip(tasks, affinity)]
    return "\n".join(lines)


def save_heatmap(affinity: np.ndarray, tasks: list[str], path: str | Path) -> Path:
    """A PNG heatmap of Z(i -> j), diverging colours centred at 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = float(np.max(np.abs(affinity))) or 1.0
    label_room = 0.08 * max(len(t) for t in tasks)  # inches for the longest tick label
    side = 1.0 + 0.7 * len(tasks)
    fig, ax = plt.subplots(figsize=(side + label_room + 1.5, side + label_room + 0.5))
    image = ax.imshow(affinity, cmap="RdBu_r", vmin=-scale, vmax=scale)
    for (i, j), value in np.ndenumerate(affinity):
        ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("task j (loss measured)")
    ax.set_ylabel("task i (step taken)")
    ax.set_title("lookahead affinity Z(i -> j)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
