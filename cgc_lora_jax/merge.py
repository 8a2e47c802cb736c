"""Fold a task's CGC-LoRA experts into plain weights (paper eq. 8), as pure functions.

Because the gate weights w(t) depend on the task only, every adapted layer of task t is the
plain dense layer

    W_t = W0 + s * A diag(c_t) B,        c_t = rank_scales(w(t), t)   (see layers.py)

where A [d_in, r] and B [r, d_out] are the concatenated experts and s = alpha / r. Only the
common columns and task t's own columns of c_t are non-zero, so the same update is the rank
r' = N_c * r_c + r_s product

    Delta W_t = A'_t B'_t,   A'_t = A[:, cols_t],   B'_t = (s * c_t[cols_t])[:, None] * B[cols_t]

which is what `task_lora_factors` returns, so any task exports as a standard LoRA adapter.

    merged = merge_task(params, task=3, cfg=cfg)      # a plain model's parameters for task 3
    factors = task_lora_factors(params, 3, cfg)       # {"a/b/query_key_value": (A', B'), ...}

`task` may be a Python int or a traced int32 scalar: both functions are jit-able.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cgc_lora_jax.layers import CGCLoRAConfig, gate_weights, rank_scales, uniform_weights

GATE_KEY = "task_gate"  # the shared gate's subtree (TaskRouting's name)
LORA_KEY = "lora"  # an adapted layer's expert subtree, beside its kernel


def _find_shared_gate(tree) -> dict | None:
    found = []

    def visit(node):
        if isinstance(node, dict):
            for key, child in node.items():
                if key == GATE_KEY and isinstance(child, dict) and child:
                    found.append(child)
                else:
                    visit(child)

    visit(tree)
    if len(found) > 1:
        raise ValueError(f"found {len(found)} '{GATE_KEY}' subtrees; a model has one shared gate")
    return found[0] if found else None


def _slot_weights(lora: dict, shared_gate: dict | None, task_ids, cfg: CGCLoRAConfig):
    if cfg.gate == "uniform":
        return uniform_weights(task_ids, cfg)
    gate = lora.get("gate") if cfg.gate == "per_layer" else shared_gate
    if gate is None:
        raise ValueError(f"gate mode {cfg.gate!r}, but the parameters hold no gate for it")
    return gate_weights(gate, task_ids, cfg)


def _map_adapted_layers(params, fn, path=()):
    """Rebuild the tree, replacing each dict that holds a kernel and a `lora` by fn(path, dict)."""
    if not isinstance(params, dict):
        return params
    if LORA_KEY in params and "kernel" in params:
        return fn("/".join(path), params)
    return {k: _map_adapted_layers(v, fn, path + (k,)) for k, v in params.items() if k != GATE_KEY}


def task_delta(lora: dict, weights, task, cfg: CGCLoRAConfig):
    """Delta W [d_in, d_out] (float32) of one layer for one task, given its slot weights [1, S]."""
    task_ids = jnp.reshape(jnp.asarray(task, jnp.int32), (1,))
    cols = rank_scales(weights, task_ids, cfg)[0] * cfg.scaling
    a = lora["A"].astype(jnp.float32)
    return (a * cols) @ lora["B"].astype(jnp.float32)


def merge_task(params: dict, task, cfg: CGCLoRAConfig) -> dict:
    """The parameters of a plain model for `task`: kernels W0 + Delta W_task, no adapters left."""
    shared_gate = _find_shared_gate(params)
    task_ids = jnp.reshape(jnp.asarray(task, jnp.int32), (1,))

    def merge_layer(path, layer):
        lora = layer[LORA_KEY]
        delta = task_delta(lora, _slot_weights(lora, shared_gate, task_ids, cfg), task, cfg)
        merged = {k: v for k, v in layer.items() if k != LORA_KEY}
        kernel = layer["kernel"]
        merged["kernel"] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
        return merged

    return _map_adapted_layers(params, merge_layer)


def task_lora_factors(params: dict, task, cfg: CGCLoRAConfig) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{layer path: (A' [d_in, r'], B' [r', d_out])} with A' B' = Delta W_task, r' = cfg.task_rank.

    Gate weights and the alpha / r scaling are folded into B', so the factors are used with
    scaling 1 (e.g. a PEFT adapter with lora_alpha = r').
    """
    shared_gate = _find_shared_gate(params)
    task_ids = jnp.reshape(jnp.asarray(task, jnp.int32), (1,))
    n_common = cfg.num_common * cfg.common_rank
    factors = {}

    def take_columns(x, axis):
        common = jax.lax.slice_in_dim(x, 0, n_common, axis=axis)
        if not cfg.specific_rank:
            return common
        start = n_common + task_ids[0] * cfg.specific_rank
        own = jax.lax.dynamic_slice_in_dim(x, start, cfg.specific_rank, axis=axis)
        return jnp.concatenate([common, own], axis=axis)

    def factor_layer(path, layer):
        lora = layer[LORA_KEY]
        weights = _slot_weights(lora, shared_gate, task_ids, cfg)
        cols = take_columns(rank_scales(weights, task_ids, cfg), axis=1)[0] * cfg.scaling
        a = take_columns(lora["A"].astype(jnp.float32), axis=1)
        b = take_columns(lora["B"].astype(jnp.float32), axis=0) * cols[:, None]
        factors[path] = (a, b)
        return layer

    _map_adapted_layers(params, factor_layer)
    return factors
