"""A training run from a config: data, base model, sharded jit steps, logs, checkpoints, resume.

    summary = train(load_config("demo_tiny"), workdir="runs/demo_tiny")

The workdir holds config.json (the resolved config), task_vocab.json, metrics.jsonl,
tensorboard/, checkpoints/<step>/ (orbax: adapters, gate, optimizer state, step, data position)
and, at the end, adapters/ (the trained adapters and gate with the run's metadata, for eval and
export). Started again on the same workdir, a run resumes from its latest checkpoint and
reproduces the uninterrupted run's losses exactly.

Multi-host: launch the same command on every host with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID set (or under SLURM / a TPU pod, where JAX finds them);
`jax.distributed.initialize()` is then called before anything touches a device.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding

from cgc_lora_jax.base_model import load_base
from cgc_lora_jax.checkpoint import RunCheckpoints, abstract_like, save_adapters
from cgc_lora_jax.config import to_json
from cgc_lora_jax.layers import CGCLoRAConfig
from cgc_lora_jax.params import count_parameters, split_params
from cgc_lora_jax.run_log import RunLog
from cgc_lora_jax.sharding import BATCH_SPEC, make_mesh
from cgc_lora_jax.task_vocab import TaskVocab
from cgc_lora_jax.train_step import TrainState, make_eval_step, make_optimizer, make_train_step

VOCAB_FILE = "task_vocab.json"


class NonFiniteLossError(FloatingPointError):
    pass


@dataclasses.dataclass
class RunData:
    vocab: TaskVocab
    train: object  # EncodedSplit
    dev: object | None
    summaries: dict  # what reading each split skipped or truncated


def maybe_initialize_distributed() -> None:
    if "JAX_COORDINATOR_ADDRESS" in os.environ or "SLURM_JOB_ID" in os.environ:
        jax.distributed.initialize()


def enable_compile_cache() -> Path:
    """Keep this process's compiled programs in $CGC_LORA_JAX_CACHE/jax-compile (JAX's persistent
    cache): a later run of the same shapes loads them instead of compiling, which on a small CPU
    is a large part of a short run."""
    from cgc_lora_jax.hub import cache_dir

    folder = cache_dir() / "jax-compile"
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return folder


def lora_config(cfg, num_tasks: int) -> CGCLoRAConfig:
    return CGCLoRAConfig(num_tasks=num_tasks, **cfg.lora.to_dict())


def data_folder(cfg, workdir: Path) -> Path:
    """data.path, or for a generated dataset (data.generate) the folder it is written into."""
    if not cfg.data.generate:
        return Path(cfg.data.path)
    from cgc_lora_jax.demo import write_generated

    return write_generated(cfg.data.generate, Path(cfg.data.path) if cfg.data.path else workdir / "data")


def read_data(cfg, workdir: Path, splits=("train", "dev"), prediction_splits=()) -> tuple:
    """(Splits, vocab): the run's saved task vocabulary wins over the config's task list."""
    from cgc_lora_jax.data import load_splits

    vocab_file = workdir / VOCAB_FILE
    vocab = TaskVocab.load(vocab_file) if vocab_file.is_file() else None
    data_format = cfg.data.format
    caps = {"train": cfg.data.max_train_per_task or None, "dev": cfg.data.max_eval_per_task or None,
            "test": cfg.data.max_eval_per_task or None}
    extra = {}
    if data_format == "jsonl":
        extra = dict(input_field=cfg.data.input_field, target_field=cfg.data.target_field, task_field=cfg.data.task_field)
    splits = load_splits(
        data_folder(cfg, workdir), data_format=data_format, splits=splits, prediction_splits=prediction_splits,
        tasks=tuple(cfg.data.tasks) or None, vocab=vocab, max_per_task=caps, seed=cfg.train.seed,
        on_error=cfg.data.on_error, **extra,
    )
    return splits, splits.vocab


def encode(cfg, split, base, vocab, for_prediction=False):
    from cgc_lora_jax.formatting import encode_split

    return encode_split(split, base.tokenizer, family=base.family, vocab=vocab, max_source_len=cfg.data.max_source_len,
                        max_target_len=cfg.data.max_target_len, for_prediction=for_prediction,
                        prompt_format=cfg.data.prompt_format, truncate_where=cfg.data.get("truncate", "end"))


def _shard_batch(batch: dict, mesh) -> dict:
    sharding = NamedSharding(mesh, BATCH_SPEC)
    return {k: jax.device_put(batch[k], sharding) for k in ("input_ids", "labels", "task_ids")}


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
    from cgc_lora_jax.batching import BatchIterator

    batches = BatchIterator(dev, batch_size=cfg.train.batch_size, seed=0, pad_multiple=cfg.data.pad_multiple,
                            shuffle=False, last_batch="pad")
    task_loss = np.zeros(len(vocab.tasks))
    task_tokens = np.zeros(len(vocab.tasks))
    for i, batch in enumerate(batches.epoch_batches(0)):
        if i >= cfg.train.eval_batches:
            break
        loss, tokens = eval_step(adapters, base_params, _shard_batch(batch.arrays(), mesh))
        task_loss += np.asarray(loss)
        task_tokens += np.asarray(tokens)
    record = {"val_loss": float(task_loss.sum() / max(task_tokens.sum(), 1))}
    record.update({f"val_loss/{t}": float(task_loss[i] / task_tokens[i]) for i, t in enumerate(vocab.tasks) if task_tokens[i]})
    return record


def train(cfg, workdir: str | Path) -> dict:
    """Run (or resume) the training job of `cfg` in `workdir`; returns the final figures."""
    from cgc_lora_jax.batching import BatchIterator

    maybe_initialize_distributed()
    if cfg.train.compile_cache:
        enable_compile_cache()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(to_json(cfg))
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} must divide by train.grad_accum={cfg.train.grad_accum}")

    mesh = make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor})
    splits, vocab = read_data(cfg, workdir)
    vocab.save(workdir / VOCAB_FILE)
    lora = lora_config(cfg, len(vocab.tasks))
    base = load_base(cfg.model, lora=lora, mesh=mesh, workdir=workdir, seed=cfg.train.seed)
    data = RunData(vocab, encode(cfg, splits.datasets["train"], base, vocab),
                   encode(cfg, splits.datasets["dev"], base, vocab) if "dev" in splits.datasets else None,
                   {k: v.as_dict() for k, v in splits.summaries.items()})

    base_params, adapters = split_params(base.params)
    trainable, total = count_parameters(base.params)
    tx, schedule = make_optimizer(cfg.train)
    state = TrainState.create(adapters, tx, cfg.train.seed)
    ckpt = RunCheckpoints(workdir, cfg.train.keep_checkpoints, base.info)
    restored = ckpt.restore_latest(abstract_like(state))
    iterator_state, start = None, 0
    if restored is not None:
        state, meta = restored
        iterator_state, start = meta["data"], int(meta["step"])
        _truncate_metrics(workdir, start)
    batches = BatchIterator(data.train, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                            pad_multiple=cfg.data.pad_multiple, state=iterator_state)

    log = RunLog(workdir, cfg.train.steps, start)
    log.info(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; mesh {dict(mesh.shape)}")
    log.info(f"base: {base.info['path']} ({base.family}); tasks: {', '.join(vocab.tasks)}")
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

    pending = None
    try:
        for step in range(start, cfg.train.steps):
            batch = next(batches)
            state, metrics = train_step(state, base_params, _shard_batch(batch.arrays(), mesh))
            # The previous step's figures are fetched while this one runs: no per-step stall.
            if pending is not None:
                absorb(*pending)
            done = step + 1
            pending = (done, metrics, batch.padding_fraction)
            log_now = done % cfg.train.log_every == 0 or done == cfg.train.steps
            eval_now = data.dev is not None and cfg.train.eval_every and (done % cfg.train.eval_every == 0 or done == cfg.train.steps)
            save_now = done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps
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
        ckpt.wait()
        save_adapters(workdir / "adapters", jax.device_get(state.adapters), {**meta, "base": base.info, "step": int(state.step)})
    finally:
        ckpt.wait()
        ckpt.close()
        log.close()
    return {"step": int(state.step), "last": last, "trainable": trainable, "total": total, "workdir": str(workdir)}
