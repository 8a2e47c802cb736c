"""A training run from a config: data, base model, sharded jit steps, logs, checkpoints, resume.

    summary = train(load_config("demo_tiny"), workdir="runs/demo_tiny")

The workdir holds config.json (the resolved config), task_vocab.json, metrics.jsonl,
tensorboard/, checkpoints/<step>/ (orbax: adapters, gate, optimizer state, step, data position)
and, at the end, adapters/ (the trained adapters and gate with the run's metadata, for eval and
export). Started again on the same workdir, a run resumes from its latest checkpoint and
reproduces the uninterrupted run's losses exactly.

Multi-host: launch the same command on every host with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID set, as srun tasks under SLURM, or with
CGC_LORA_DISTRIBUTED=1 on a TPU pod (JAX detects the pod); see training/distributed.py for how
each host builds its rows of a global batch. Host 0 writes the workdir's files; all hosts write
the checkpoints together, so the workdir must be one shared folder. SIGTERM saves the step in
flight and stops (training/preemption.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import numpy as np

from cgc_lora_jax.run import (ADAPTERS_DIR, VOCAB_FILE, data_folder, encode, load_base, lora_config, read_data,
                              save_adapters)
from cgc_lora_jax.training.checkpoint import RunCheckpoints, abstract_like
from cgc_lora_jax.training.checkpoint_checks import RunConfigMismatchError
from cgc_lora_jax.training.distributed import (barrier, global_batch, host_rows, initialize_from_env, is_primary,
                                               replicate_on_mesh)
from cgc_lora_jax.training.preemption import PreemptionWatch
from cgc_lora_jax.config import to_json
from cgc_lora_jax.params import count_parameters, split_params
from cgc_lora_jax.precision import describe_dtype
from cgc_lora_jax.training.run_log import RunLog
from cgc_lora_jax.sharding import make_mesh
from cgc_lora_jax.data.task_vocab import TaskVocab
from cgc_lora_jax.training.step import TrainState, make_eval_step, make_optimizer, make_train_step


class NonFiniteLossError(FloatingPointError):
    pass


@dataclasses.dataclass
class RunData:
    vocab: TaskVocab
    train: object  # EncodedSplit
    dev: object | None
    summaries: dict  # what reading each split skipped or truncated


def _shard_batch(batch: dict, mesh, batch_size: int) -> dict:
    return global_batch({k: batch[k] for k in ("input_ids", "labels", "task_ids")}, mesh, batch_size)


def _truncate_metrics(workdir: Path, step: int) -> None:
    """On resume, drop records the interrupted run logged after its last checkpoint."""
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def validation_loss(eval_step, adapters, base_params, dev, cfg, mesh, vocab) -> dict:
    from cgc_lora_jax.data.batching import BatchIterator

    batches = BatchIterator(dev, batch_size=cfg.train.batch_size, seed=0, pad_multiple=cfg.data.pad_multiple,
                            shuffle=False, last_batch="pad", rows=host_rows(mesh, cfg.train.batch_size))
    task_loss = np.zeros(len(vocab.tasks))
    task_tokens = np.zeros(len(vocab.tasks))
    for i, batch in enumerate(batches.epoch_batches(0)):
        if i >= cfg.train.eval_batches:
            break
        loss, tokens = eval_step(adapters, base_params, _shard_batch(batch.arrays(), mesh, cfg.train.batch_size))
        task_loss += np.asarray(loss)
        task_tokens += np.asarray(tokens)
    record = {"val_loss": float(task_loss.sum() / max(task_tokens.sum(), 1))}
    record.update({f"val_loss/{t}": float(task_loss[i] / task_tokens[i]) for i, t in enumerate(vocab.tasks) if task_tokens[i]})
    return record


def enable_compile_cache() -> Path:
    """Keep this process's compiled programs in $CGC_LORA_JAX_CACHE/jax-compile (JAX's persistent
    cache): a later run of the same shapes loads them instead of compiling, which on a small CPU
    is a large part of a short run."""
    from cgc_lora_jax.cache import cache_dir

    folder = cache_dir() / "jax-compile"
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return folder


def _check_counts(train_cfg) -> None:
    """Step counts a run divides by: a clear error instead of a crash in the middle of the loop."""
    if train_cfg.steps < 1:
        raise ValueError(f"train.steps={train_cfg.steps} must be at least 1")
    for key in ("log_every", "eval_every", "checkpoint_every"):
        if train_cfg[key] < 0:
            raise ValueError(f"train.{key}={train_cfg[key]} must be 0 (only at the last step) or a positive step count")


def _every(done: int, period: int) -> bool:
    """Whether step `done` is a multiple of `period`; a period of 0 never is (the last step still counts)."""
    return period > 0 and done % period == 0


def train(cfg, workdir: str | Path) -> dict:
    """Run (or resume) the training job of `cfg` in `workdir`; returns the final figures."""
    from cgc_lora_jax.data.batching import BatchIterator

    initialize_from_env()
    if cfg.train.get("compile_cache", False):
        enable_compile_cache()
    primary = is_primary()  # host 0 writes the workdir's files; every host reads them
    workdir = Path(workdir)
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} must divide by train.grad_accum={cfg.train.grad_accum}")
    _check_counts(cfg.train)

    mesh = make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor})
    if primary:
        workdir.mkdir(parents=True, exist_ok=True)
        data_folder(cfg.data, workdir)  # a generated dataset is written once
    barrier("cgc_lora_jax:workdir")
    splits, vocab = read_data(cfg.data, workdir, seed=cfg.train.seed)
    barrier("cgc_lora_jax:read")
    if primary:
        vocab.save(workdir / VOCAB_FILE)
    lora = lora_config(cfg.lora, len(vocab.tasks))
    base = load_base(cfg.model, lora=lora, mesh=mesh, workdir=workdir if primary else None, seed=cfg.train.seed)
    data = RunData(vocab, encode(cfg.data, splits.datasets["train"], base, vocab),
                   encode(cfg.data, splits.datasets["dev"], base, vocab) if "dev" in splits.datasets else None,
                   {k: v.as_dict() for k, v in splits.summaries.items()})

    base_params, adapters = split_params(base.params)
    trainable, total = count_parameters(base.params)
    tx, schedule = make_optimizer(cfg.train)
    state = replicate_on_mesh(TrainState.create(adapters, tx, cfg.train.seed), mesh)
    ckpt = RunCheckpoints(workdir, cfg.train.keep_checkpoints, base.info)
    restored = ckpt.restore_latest(abstract_like(state), cfg.to_dict())
    iterator_state, start = None, 0
    if restored is not None:
        state, meta = restored
        iterator_state, start = meta["data"], int(meta["step"])
    try:
        batches = BatchIterator(data.train, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                                pad_multiple=cfg.data.pad_multiple, state=iterator_state,
                                rows=host_rows(mesh, cfg.train.batch_size))
    except ValueError as e:
        if iterator_state is None:
            raise
        raise RunConfigMismatchError(f"{ckpt.directory / str(start)} was saved at a position in other training "
                                     f"data than {data.summaries['train'].get('path')} holds now ({e}); "
                                     "restore that data, or start a new --workdir") from e
    if primary:  # after the checks: a refused resume keeps the saved config.json and metrics
        if restored is not None:
            _truncate_metrics(workdir, start)
        (workdir / "config.json").write_text(to_json(cfg))

    log = RunLog(workdir, cfg.train.steps, start, write_files=primary)
    log.info(f"devices: {jax.device_count()} x {jax.devices()[0].platform} on {jax.process_count()} host(s); "
             f"mesh {dict(mesh.shape)}")
    log.info(f"base: {base.info['path']} ({base.family}, {describe_dtype(cfg.model.dtype)}); "
             f"tasks: {', '.join(vocab.tasks)}")
    log.info(f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.4%})")
    log.info(f"train samples: {len(data.train)}; truncated: {dict(data.train.truncated) or 'none'}; "
             f"read: {data.summaries.get('train')}")
    if restored is not None:
        log.info(f"resumed from {ckpt.directory / str(start)}")

    train_step = jax.jit(make_train_step(base.model, tx, schedule, len(vocab.tasks), cfg.train.grad_accum), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(base.model, len(vocab.tasks)))
    meta = {"config": cfg.to_dict(), "task_vocab": list(vocab.tasks), "family": base.family}
    losses, padding = [], []
    window_task_loss, window_task_tokens = np.zeros(len(vocab.tasks)), np.zeros(len(vocab.tasks))
    last = {}

    def absorb(done: int, metrics, padding_fraction: float) -> dict:
        """Fetch one step's figures (a host sync), stop on a non-finite loss, add to the window."""
        metrics = jax.device_get(metrics)
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            good = ckpt.latest_step()
            raise NonFiniteLossError(
                f"step {done}: the loss is {loss}; stopping. The last good checkpoint is "
                f"{ckpt.directory / str(good) if good is not None else 'none (no checkpoint yet)'}; "
                "lower train.lr or check the data"
            )
        losses.append(loss)
        padding.append(padding_fraction)
        window_task_loss[:] += np.asarray(metrics["task_loss"]) * np.asarray(metrics["task_tokens"])
        window_task_tokens[:] += np.asarray(metrics["task_tokens"])
        log.count_tokens(float(metrics["tokens"]))
        log.advance()
        return metrics

    pending, preempted = None, None
    preemption = PreemptionWatch()
    try:
        for step in range(start, cfg.train.steps):
            batch = next(batches)
            state, metrics = train_step(state, base_params, _shard_batch(batch.arrays(), mesh, cfg.train.batch_size))
            # The previous step's figures are fetched while this one runs: no per-step stall.
            if pending is not None:
                absorb(*pending)
            done = step + 1
            pending = (done, metrics, batch.padding_fraction)
            log_now = _every(done, cfg.train.log_every) or done == cfg.train.steps
            eval_now = data.dev is not None and cfg.train.eval_every > 0 and (_every(done, cfg.train.eval_every) or done == cfg.train.steps)
            if preemption.reached(done):
                preempted = done
            save_now = _every(done, cfg.train.checkpoint_every) or done == cfg.train.steps or preempted
            if not (log_now or eval_now or save_now):
                continue
            metrics, pending = absorb(*pending), None  # every loss up to `done` is checked before a save
            if log_now:
                last = {"loss": float(np.mean(losses)), "lr": float(metrics["lr"]), "grad_norm": float(metrics["grad_norm"]),
                        "padding_fraction": float(np.mean(padding)), "epoch": batches.epoch,
                        # per task: token-weighted over the logging window
                        **{f"loss/{t}": float(l / n) for t, l, n in zip(vocab.tasks, window_task_loss, window_task_tokens) if n}}
                log.train(done, last)
                losses.clear()
                padding.clear()
                window_task_loss[:], window_task_tokens[:] = 0.0, 0.0
            if eval_now:
                log.validation(done, validation_loss(eval_step, state.adapters, base_params, data.dev, cfg, mesh, vocab))
            if save_now:
                ckpt.save(done, state, {**meta, "data": batches.state()})
            if preempted:
                ckpt.wait()
                log.info(f"SIGTERM received: saved checkpoint {ckpt.directory / str(done)} at step {done} "
                         "and stopped; run the same command to resume")
                return {"step": done, "last": last, "trainable": trainable, "total": total, "workdir": str(workdir),
                        "preempted": True}
        ckpt.wait()
        save_adapters(workdir / ADAPTERS_DIR, jax.device_get(state.adapters), {**meta, "base": base.info, "step": int(state.step)})
    finally:
        preemption.close()
        try:
            ckpt.wait()
            ckpt.close()
        finally:
            log.close()
    return {"step": int(state.step), "last": last, "trainable": trainable, "total": total, "workdir": str(workdir)}
