"""The jit-compiled training and validation steps.

Loss: conditional language-model cross-entropy over target tokens. Logits at position i predict
the label at position i + 1; labels of -100 (prompt and padding) are ignored. The loss is the
mean over all target tokens of the batch (every token weighs the same, whichever sequence or
micro-batch it is in), so gradient accumulation gives exactly the full batch's gradient.

Only the adapters are differentiated and optimised: the base parameters are an argument of the
step (never a compiled-in constant) and get no gradient and no optimizer state. The optimizer is
AdamW with linear warmup then cosine decay, after global-norm clipping:

    tx, schedule = make_optimizer(cfg.train)
    state = TrainState.create(adapters, tx, seed)
    step = jax.jit(make_train_step(model, tx, schedule, num_tasks, grad_accum), donate_argnums=0)
    state, metrics = step(state, base, batch)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from cgc_lora_jax.loss import IGNORE, token_losses
from cgc_lora_jax.params import join_params
from cgc_lora_jax.target_loss import target_token_sums


@struct.dataclass
class TrainState:
    step: jax.Array
    adapters: Any
    opt_state: Any
    rng: jax.Array

    @classmethod
    def create(cls, adapters, tx: optax.GradientTransformation, seed: int) -> "TrainState":
        return cls(jnp.zeros((), jnp.int32), adapters, tx.init(adapters), jax.random.key_data(jax.random.key(seed)))


def make_optimizer(train_cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train_cfg.lr,
        warmup_steps=max(train_cfg.warmup_steps, 0),
        decay_steps=max(train_cfg.steps, train_cfg.warmup_steps + 1),
        end_value=train_cfg.lr * train_cfg.end_lr_ratio,
    )
    # Decay the expert matrices only; the gate's embeddings and logit maps are left undecayed.
    decay_mask = lambda tree: jax.tree_util.tree_map_with_path(lambda p, _: p[-1].key in ("A", "B"), tree)
    parts = [optax.clip_by_global_norm(train_cfg.grad_clip)] if train_cfg.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, weight_decay=train_cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule


def _per_task(values_b: jax.Array, task_ids: jax.Array, num_tasks: int) -> jax.Array:
    return jax.nn.one_hot(task_ids, num_tasks, dtype=jnp.float32).T @ values_b


def example_sums(model: nn.Module, params, batch, rng, deterministic: bool) -> tuple[jax.Array, jax.Array]:
    """Summed target-token loss [B] and target counts [B] of a batch.

    A model with a frozen output head (`frozen_head`, `hidden_states`: models/llama.py) takes
    the head on target positions only, in chunks (target_loss.py): the same loss without the
    [B, T, V] float32 logits. Other models go through their full logits.
    """
    kw = dict(deterministic=deterministic, rngs=None if deterministic else {"dropout": rng})
    if "segment_ids" in batch:  # packed rows (cgc_lora_jax/data/packing.py)
        kw["segment_ids"] = batch["segment_ids"]
    head = model.frozen_head(params) if hasattr(model, "frozen_head") else None
    if head is not None:
        hidden = model.apply({"params": params}, batch["input_ids"], None, batch["task_ids"],
                             method=model.hidden_states, **kw)
        return target_token_sums(hidden, head, batch["labels"])
    logits = model.apply({"params": params}, batch["input_ids"], None, batch["task_ids"], **kw)
    nll, mask = token_losses(logits, batch["labels"])
    return nll.sum(axis=1), mask.sum(axis=1).astype(jnp.float32)


def _forward_sums(model: nn.Module, params, batch, rng, deterministic: bool, num_tasks: int):
    """Summed token loss, and per-task summed loss and token counts, of one (micro-)batch."""
    per_example, counts = example_sums(model, params, batch, rng, deterministic)
    return per_example.sum(), (_per_task(per_example, batch["task_ids"], num_tasks), _per_task(counts, batch["task_ids"], num_tasks))


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule, num_tasks: int, grad_accum: int = 1):
    def step(state: TrainState, base, batch: dict):
        total_tokens = jnp.maximum(jnp.sum(batch["labels"][:, 1:] != IGNORE), 1).astype(jnp.float32)
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def micro_grads(carry, micro):
            i, micro_batch = micro
            def loss_fn(adapters):
                total, aux = _forward_sums(
                    model, join_params(base, adapters), micro_batch, jax.random.fold_in(rng, i), False, num_tasks
                )
                return total / total_tokens, aux
            (loss, (task_loss, task_tokens)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.adapters)
            acc_grads, acc_loss, acc_task_loss, acc_task_tokens = carry
            return (jax.tree.map(jnp.add, acc_grads, grads), acc_loss + loss,
                    acc_task_loss + task_loss, acc_task_tokens + task_tokens), None

        micro_batches = jax.tree.map(lambda a: a.reshape((grad_accum, -1) + a.shape[1:]), batch)
        zeros = (jax.tree.map(jnp.zeros_like, state.adapters), jnp.zeros(()), jnp.zeros(num_tasks), jnp.zeros(num_tasks))
        (grads, loss, task_loss, task_tokens), _ = jax.lax.scan(
            micro_grads, zeros, (jnp.arange(grad_accum), micro_batches)
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.adapters)
        adapters = optax.apply_updates(state.adapters, updates)
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "lr": schedule(state.step),
            "task_loss": task_loss / jnp.maximum(task_tokens, 1.0),
            "task_tokens": task_tokens,
            "tokens": total_tokens,
        }
        return state.replace(step=state.step + 1, adapters=adapters, opt_state=opt_state), metrics

    return step


def make_eval_step(model: nn.Module, num_tasks: int):
    """Summed validation loss and token counts per task of one batch (no dropout)."""

    def eval_step(adapters, base, batch: dict):
        _, (task_loss, task_tokens) = _forward_sums(model, join_params(base, adapters), batch, None, True, num_tasks)
        return task_loss, task_tokens

    return eval_step
