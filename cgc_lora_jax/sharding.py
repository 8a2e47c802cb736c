"""Partition rules: an ordered list of (regex on the parameter path, PartitionSpec).

Paths are the parameter tree's keys joined by "/", e.g. "transformer/layers_0/attention/
query_key_value/kernel". The first rule whose regex is found in the path wins; a family's list
ends in an explicit catch-all, and a path that no rule matches is an error. Mesh axes are
("data", "fsdp", "tensor"): batches split over data x fsdp, large kernels over fsdp and tensor.

    specs = match_partition_rules(family.partition_rules, params)
    params = jax.device_put(params, named_shardings(mesh, specs))
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_SPEC = P(("data", "fsdp"))  # the leading (batch) axis of inputs

# The adapters are small (rank <= a few dozen): keep them and the gate replicated, so the
# fused x A -> scale -> B path needs no collectives beyond the base layer's own.
ADAPTER_RULES: tuple[tuple[str, P], ...] = (
    (r"(^|/)task_gate/", P()),
    (r"/lora/gate/", P()),
    (r"/lora/(A|B)$", P()),
)


def make_mesh(shape: dict[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; `shape` maps axis -> size, -1 (once) takes the rest.

    A shape without -1 uses the first prod(sizes) devices.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = dict(shape or {"data": -1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh axes {sorted(unknown)} are not among {MESH_AXES}")
    sizes = [shape.get(axis, 1) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        sizes[sizes.index(-1)] = len(devices) // known
    used = int(np.prod(sizes))
    if used == 0 or used > len(devices) or (-1 in shape.values() and used != len(devices)):
        raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))} does not fit {len(devices)} devices")
    # A fully explicit shape may use fewer devices than there are (e.g. {"data": 1}).
    return Mesh(np.asarray(devices[:used]).reshape(sizes), MESH_AXES)


def match_partition_rules(rules: Sequence[tuple[str, P]], params) -> dict:
    """The PartitionSpec tree for `params` (same structure); an unmatched path is an error."""
    flat = traverse_util.flatten_dict(params, sep="/")
    specs = {}
    for path, leaf in flat.items():
        for pattern, spec in rules:
            if re.search(pattern, path):
                break
        else:
            raise ValueError(f"no partition rule matches parameter {path!r}; add one to the family's rules")
        if len(spec) > len(np.shape(leaf)):
            raise ValueError(f"partition rule {pattern!r} gives {spec} to {path!r} of shape {np.shape(leaf)}")
        specs[path] = spec
    return traverse_util.unflatten_dict(specs, sep="/")


def named_shardings(mesh: Mesh, specs) -> dict:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def first_device() -> jax.sharding.SingleDeviceSharding:
    """Where a base loaded without a mesh lives: committed to the first device, like everything
    computed from it (merged kernels, restored adapters). jit keys its programs on placement, so a
    mix of uncommitted and committed params would compile generation twice."""
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])

