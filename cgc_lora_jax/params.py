"""Split a parameter tree into the frozen base and the trainable adapters, and freeze the base.

Adapters are every leaf under a `lora` subtree (an adapted layer's experts and per-layer gate)
or under the shared `task_gate`; everything else is the base. Training differentiates only the
adapters and holds the base as a constant, so no gradient or optimizer state exists for the
frozen weights:

    base, adapters = split_params(params)
    loss, grads = jax.value_and_grad(lambda a: loss_fn(join_params(base, a)))(adapters)

When an optimizer must see the whole tree, `freeze_base(tx, params)` states the same freeze as
an optax mask: the base's updates are exactly zero and it keeps no optimizer state.
"""

from __future__ import annotations

import jax
import optax
from flax import traverse_util

from cgc_lora_jax.merge import GATE_KEY, LORA_KEY


def is_adapter_path(path: tuple[str, ...]) -> bool:
    return LORA_KEY in path or GATE_KEY in path


def split_params(params: dict) -> tuple[dict, dict]:
    """(base, adapters): two nested dicts whose leaves partition `params`' leaves."""
    flat = traverse_util.flatten_dict(params)
    base = {p: v for p, v in flat.items() if not is_adapter_path(p)}
    adapters = {p: v for p, v in flat.items() if is_adapter_path(p)}
    return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(adapters)


def join_params(base: dict, adapters: dict) -> dict:
    """Inverse of `split_params`."""
    flat = traverse_util.flatten_dict(base)
    for path, leaf in traverse_util.flatten_dict(adapters).items():
        if path in flat:
            raise ValueError(f"parameter {'/'.join(path)} is in both the base and the adapters")
        flat[path] = leaf
    return traverse_util.unflatten_dict(flat)


def trainable_mask(params: dict) -> dict:
    """A tree of bools like `params`: True for adapter leaves."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({p: is_adapter_path(p) for p in flat})


def freeze_base(tx: optax.GradientTransformation, params: dict) -> optax.GradientTransformation:
    """`tx` on the adapters, zero updates (and no state) for the base."""
    labels = jax.tree.map(lambda trainable: "adapter" if trainable else "frozen", trainable_mask(params))
    return optax.multi_transform({"adapter": tx, "frozen": optax.set_to_zero()}, labels)


def count_parameters(params: dict) -> tuple[int, int]:
    """(trainable, total) parameter counts; trainable = the adapters and gate.

    For a CGC-LoRA model with L adapted layers of shapes (d_in, d_out)_l:
        trainable = sum_l r * (d_in_l + d_out_l) + gate
    with r = N_c * r_c + M * r_s (the equal-rank plain LoRA's count) and gate =
    d_e * (2 M + N_c) once ("shared"), once per adapted layer ("per_layer") or 0 ("uniform");
    N_c (resp. the M vectors V) drop out when there are no common (resp. specific) experts.
    """
    trainable = total = 0
    for path, leaf in traverse_util.flatten_dict(params).items():
        total += leaf.size
        trainable += leaf.size if is_adapter_path(path) else 0
    return trainable, total
