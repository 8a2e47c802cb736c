"""cgc_lora_jax/sharding.py: mesh shapes, rule matching (first match wins, no silent fallback), and
a sharded matmul equal to the single-device one on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cgc_lora_jax.sharding import ADAPTER_RULES, MESH_AXES, make_mesh, match_partition_rules, named_shardings

RULES = (*ADAPTER_RULES, (r"dense/kernel$", P("fsdp", "tensor")), (r"embed", P("tensor", None)), (r".*", P()))
PARAMS = {
    "embed": {"embedding": np.zeros((16, 8))},
    "block": {"dense": {"kernel": np.zeros((8, 12)), "bias": np.zeros(12),
                        "lora": {"A": np.zeros((8, 4)), "B": np.zeros((4, 12))}}},
    "task_gate": {"embed": np.zeros((3, 2))},
}


def test_mesh_shapes():
    assert jax.device_count() == 8
    assert dict(make_mesh({"data": -1}).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(make_mesh({"data": -1, "tensor": 2}).shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    mesh = make_mesh({"data": 1, "fsdp": 2})  # explicit: uses the first 2 devices only
    assert mesh.devices.size == 2 and mesh.axis_names == MESH_AXES
    for bad, why in [({"pipeline": 2}, "not among"), ({"data": -1, "fsdp": -1}, "at most one"), ({"data": 16}, "does not fit")]:
        with pytest.raises(ValueError, match=why):
            make_mesh(bad)


def test_first_matching_rule_wins_and_adapters_are_replicated():
    specs = match_partition_rules(RULES, PARAMS)
    assert specs["block"]["dense"]["kernel"] == P("fsdp", "tensor")
    assert specs["block"]["dense"]["bias"] == P()  # the catch-all
    assert specs["block"]["dense"]["lora"]["A"] == P() and specs["block"]["dense"]["lora"]["B"] == P()
    assert specs["task_gate"]["embed"] == P()  # ADAPTER_RULES come first, before "embed"
    assert specs["embed"]["embedding"] == P("tensor", None)


def test_unmatched_path_and_too_long_spec_are_errors_naming_the_path():
    with pytest.raises(ValueError, match="block/dense/bias"):
        match_partition_rules(RULES[:-1], PARAMS)
    with pytest.raises(ValueError, match="embed/embedding"):
        match_partition_rules(((r"embed", P("tensor", None, None)), (r".*", P())), PARAMS)


def test_sharded_matmul_equals_single_device():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rng = np.random.default_rng(0)
    params = {"block": {"dense": {"kernel": rng.normal(size=(8, 12)).astype(np.float32),
                                  "bias": rng.normal(size=12).astype(np.float32)}}}
    x = rng.normal(size=(4, 8)).astype(np.float32)
    shardings = named_shardings(mesh, match_partition_rules(RULES, params))
    sharded = jax.device_put(params, shardings)
    kernel = sharded["block"]["dense"]["kernel"]
    assert kernel.sharding.spec == P("fsdp", "tensor") and len(kernel.addressable_shards) == 8
    assert kernel.addressable_shards[0].data.shape == (4, 6)
    f = jax.jit(lambda p, x: x @ p["block"]["dense"]["kernel"] + p["block"]["dense"]["bias"])
    reference = x.astype(np.float64) @ params["block"]["dense"]["kernel"] + params["block"]["dense"]["bias"]
    np.testing.assert_allclose(np.asarray(f(sharded, jnp.asarray(x))), reference, rtol=1e-5, atol=1e-5)
    # the fsdp axis splits the contraction, so the sum's order (not its value) differs
    np.testing.assert_allclose(np.asarray(f(sharded, x)), np.asarray(f(params, x)), rtol=1e-6, atol=1e-6)
