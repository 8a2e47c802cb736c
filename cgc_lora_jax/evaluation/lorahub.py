"""LoRAHub baseline: compose per-task LoRAs for a target task with gradient-free weights.

Sources: a "LoRA Single" run (`CGCLoRAConfig.lora_single`: no common experts, one specific
expert per task) holds, in every adapted layer, task i's own LoRA (A_i [d_in, r], B_i [r, d_out]),
columns i*r .. (i+1)*r of the concatenated A and B. For a target task and weights w (one per
source), LoRAHub (Huang et al. 2023, sail-sg/lorahub) composes the modules factor by factor,

    A_hub = sum_i w_i A_i,      B_hub = sum_i w_i B_i,      W = W0 + s * A_hub B_hub

(s = alpha / total rank of the run, so w = one-hot(t) gives task t's own merged model), and
chooses w by gradient-free minimisation (nevergrad's NGOpt, w_i in [-1.5, 1.5], starting at 0) of

    objective(w) = L_k(w) + alpha_l1 * (1 / N) * sum_i |w_i|

where L_k is the mean token cross-entropy of the composed model on k training examples of the
target task and N the number of sources. As in the original's `default_l1_regularization`, the
L1 term is the mean |w_i| times alpha_l1 = 0.05; the original sums per-batch mean losses and
divides by k, here L_k is the plain per-token mean over all k examples.

By default every task's LoRA is a source (the MOELoRA / CGC-LoRA papers' baseline, where the
target's own LoRA is among them); `include_target=False` gives the original unseen-task setting.

    sources = source_loras(params, lora_cfg)                 # {layer: (A [N, d_in, r], B [N, r, d_out])}
    plain = merge_composed(base, compose(sources, w), lora_cfg.scaling)
    scores = run_lorahub("runs/lora_single", shots=5, budget=40)   # writes runs/lora_single/lorahub/
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
import warnings
import zlib
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from tqdm.auto import tqdm

from cgc_lora_jax.data.batching import make_batch
from cgc_lora_jax.layers import CGCLoRAConfig
from cgc_lora_jax.params import split_params
from cgc_lora_jax.loss import token_losses

WEIGHT_BOUND = 1.5  # |w_i| <= 1.5, the original's bounds
DEFAULT_ALPHA = 0.05  # the original's L1 coefficient
RESULTS_FILE = "lorahub.json"


def source_loras(params: dict, cfg: CGCLoRAConfig) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{layer path "a/b/query_key_value": (A [M, d_in, r], B [M, r, d_out])}: task i's own LoRA
    at index i, from the parameters of a LoRA Single run."""
    from cgc_lora_jax.run import RunError

    if cfg.num_common != 0 or cfg.specific_rank == 0:
        raise RunError(
            f"LoRAHub composes per-task LoRAs: it needs a LoRA Single run (lora.num_common=0, "
            f"lora.specific_rank>0), got num_common={cfg.num_common}, specific_rank={cfg.specific_rank}")
    flat = traverse_util.flatten_dict(params)
    m, r = cfg.num_tasks, cfg.specific_rank
    sources = {}
    for path, lora_a in flat.items():
        if path[-2:] != ("lora", "A"):
            continue
        lora_b = flat[path[:-1] + ("B",)]
        sources["/".join(path[:-2])] = (
            jnp.transpose(jnp.reshape(lora_a, (lora_a.shape[0], m, r)), (1, 0, 2)),
            jnp.reshape(lora_b, (m, r, lora_b.shape[-1])),
        )
    if not sources:
        raise ValueError("the parameters hold no adapted layer (no .../lora/A)")
    return sources


def compose(sources: dict, weights) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{layer: (A_hub = sum_i w_i A_i, B_hub = sum_i w_i B_i)} (float32) for weights [N]."""
    w = jnp.asarray(weights, jnp.float32)
    return {path: (jnp.tensordot(w, a.astype(jnp.float32), axes=1), jnp.tensordot(w, b.astype(jnp.float32), axes=1))
            for path, (a, b) in sources.items()}


def merge_composed(base: dict, composed: dict, scaling: float) -> dict:
    """A plain model's parameters: W0 + scaling * A_hub B_hub for every composed layer.

    base: the frozen parameters without adapters (`split_params(params)[0]`).
    """
    flat = traverse_util.flatten_dict(base)
    for path, (a_hub, b_hub) in composed.items():
        key = tuple(path.split("/")) + ("kernel",)
        if key not in flat:
            raise KeyError(f"{'/'.join(key)} is not a base parameter")
        kernel = flat[key]
        flat[key] = (kernel.astype(jnp.float32) + scaling * (a_hub @ b_hub)).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _few_shot_loss(plain_model, scaling: float, weights, base: dict, sources: dict, input_ids, labels):
    params = merge_composed(base, compose(sources, weights), scaling)
    logits = plain_model.apply({"params": params}, input_ids, None, None)
    nll, mask = token_losses(logits, labels)
    return nll.sum() / jnp.maximum(mask.sum(), 1)


def few_shot_loss_fn(plain_model, base: dict, sources: dict, scaling: float, batch: dict) -> Callable:
    """weights [N] -> mean token cross-entropy of the composed model on `batch`.

    batch: right-padded training arrays {"input_ids", "labels"} of the k examples. The base and
    the sources are arguments of one compiled function (never constants baked into it), so a
    large base is not copied into the program and the next target task reuses the compilation
    when its batch has the same shape.
    """
    input_ids, labels = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["labels"])
    return lambda weights: float(
        _few_shot_loss(plain_model, scaling, jnp.asarray(weights, jnp.float32), base, sources, input_ids, labels)
    )


def l1_penalty(weights, alpha: float) -> float:
    """alpha * (1/N) sum_i |w_i|, the original's default_l1_regularization."""
    return float(alpha * np.mean(np.abs(np.asarray(weights, np.float64))))


def learn_weights(loss: Callable, num_sources: int, budget: int, alpha: float = DEFAULT_ALPHA,
                  seed: int = 0) -> tuple[np.ndarray, list[tuple[np.ndarray, float]]]:
    """(w, history): NGOpt's recommendation for min_w loss(w) + l1_penalty(w, alpha) over
    w in [-1.5, 1.5]^N from w = 0, and every (w, objective) it evaluated. Seeded."""
    import nevergrad as ng

    if budget < 1:
        raise ValueError(f"budget={budget}: need at least one evaluation")
    history = []

    def objective(weights):
        value = loss(weights) + l1_penalty(weights, alpha)
        history.append((np.array(weights), value))
        return value

    parametrization = ng.p.Array(init=np.zeros(num_sources), lower=-WEIGHT_BOUND, upper=WEIGHT_BOUND)
    parametrization.random_state = np.random.RandomState(seed)
    optimizer = ng.optimizers.NGOpt(parametrization=parametrization, budget=budget, num_workers=1)
    with warnings.catch_warnings():  # scipy's COBYLA, which NGOpt may pick, warns about its own defaults
        warnings.filterwarnings("ignore", message="COBYLA: Invalid RHOEND")
        recommendation = optimizer.minimize(objective)
    return np.asarray(recommendation.value, np.float64), history


def few_shot_rows(train_records, task: str, shots: int, seed: int) -> list[int]:
    """Indices of `shots` training records of `task`, a seeded choice kept in file order."""
    rows = [i for i, task_name in enumerate(train_records["task_dataset"]) if task_name == task]
    if not rows:
        raise ValueError(f"the training split has no example of task {task!r}")
    rng = np.random.default_rng([seed, zlib.crc32(task.encode("utf-8"))])
    return sorted(rows[i] for i in rng.choice(len(rows), size=min(shots, len(rows)), replace=False))


@dataclasses.dataclass
class HubResult:
    task: str
    sources: list[str]  # source tasks, in weight order
    weights: list[float]
    objective: float  # few-shot loss + L1 at the recommended weights
    few_shot_loss: float
    shots: list[str]  # sample_ids of the few-shot examples
    seconds: float


def select_sources(sources: dict, index) -> dict:
    """The sources at positions `index` (an int array), in that order."""
    index = np.asarray(index)
    return {path: (a[index], b[index]) for path, (a, b) in sources.items()}


def fit_task(run, sources: dict, task: str, shots: int, budget: int, alpha: float, seed: int,
             include_target: bool) -> HubResult:
    """Learn the composition weights of `task` on a loaded LoRA Single run (evaluate.load_run),
    given all its `source_loras`."""
    from cgc_lora_jax.run import encode

    start = time.perf_counter()
    target = run.vocab.id(task)
    keep = [i for i in range(len(run.vocab.tasks)) if include_target or i != target]
    if not keep:
        raise ValueError(f"no source LoRA left for {task!r}: the run has one task; keep the target")
    rows = few_shot_rows(run.train, task, shots, seed)
    examples = encode(run.cfg.data, [run.train[i] for i in rows], run.base, run.vocab)
    batch = make_batch(examples, np.arange(len(rows)), pad_multiple=run.cfg.data.pad_multiple).arrays()
    loss = few_shot_loss_fn(run.base.model.clone(lora=None), split_params(run.params)[0],
                            select_sources(sources, keep), run.lora.scaling, batch)
    weights, _ = learn_weights(loss, len(keep), budget, alpha, seed)
    final_loss = loss(weights)
    return HubResult(task, [run.vocab.tasks[i] for i in keep], weights.tolist(),
                     final_loss + l1_penalty(weights, alpha), final_loss,
                     [run.train[i]["sample_id"] for i in rows], time.perf_counter() - start)


def run_lorahub(workdir: str | Path, out_dir: str | Path | None = None, *, shots: int = 5, budget: int = 40,
                alpha: float = DEFAULT_ALPHA, split: str | None = None, seed: int | None = None,
                include_target: bool = True, every_record: bool = False) -> dict[str, float]:
    """LoRAHub on every task of a LoRA Single run: learn each task's weights, generate its
    prompts with the composed, merged model, and write OUT (default WORKDIR/lorahub) like an
    evaluated run: lorahub.json (weights per task), predictions, scores, table and chart.
    every_record: answer all of the split, whatever the run's data.max_eval_per_task."""
    from cgc_lora_jax.evaluation.answers import GenerationSettings, generate_answers
    from cgc_lora_jax.evaluation.evaluate import benchmark_of, load_run, split_file, write_results

    run = load_run(workdir, split, with_train=True, every_record=every_record)
    sources = source_loras(run.params, run.lora)
    out_dir = Path(out_dir) if out_dir is not None else run.workdir / "lorahub"
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = run.cfg.train.seed if seed is None else seed
    plain, base = run.base.model.clone(lora=None), split_params(run.params)[0]
    results, answers = {}, {}
    bar = tqdm(total=len(run.records), desc=f"lorahub {run.split}", unit="sample")
    for task_id, task in enumerate(run.vocab.tasks):
        rows = np.flatnonzero(run.prompts.task_ids == task_id)
        if len(rows) == 0:
            continue
        bar.set_postfix(task=task)
        result = fit_task(run, sources, task, shots, budget, alpha, seed, include_target)
        results[task] = dataclasses.asdict(result)
        bar.write(f"{task}: weights {dict(zip(result.sources, np.round(result.weights, 3)))}, "
                  f"few-shot loss {result.few_shot_loss:.4f}")
        chosen = select_sources(sources, [run.vocab.id(s) for s in result.sources])
        merged = merge_composed(base, compose(chosen, result.weights), run.lora.scaling)
        answers.update(generate_answers(plain, merged, run.prompts, rows, GenerationSettings.from_config(run.cfg),
                                        run.base.tokenizer, bar=bar))
    bar.close()
    settings = {"workdir": str(run.workdir), "split": run.split, "shots": shots, "budget": budget, "alpha": alpha,
                "seed": seed, "include_target": include_target}
    (out_dir / RESULTS_FILE).write_text(json.dumps({"settings": settings, "tasks": results}, indent=2,
                                                   ensure_ascii=False) + "\n", encoding="utf-8")
    return write_results(out_dir, run.split, run.records, answers, benchmark_of(run.cfg.data), out_dir.name,
                         split_file(run.cfg.data, run.workdir, run.split))
