"""Freezing the base: split/join, the optax mask, trainable counts, one step; sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from cgc_lora_jax.layers import CGCLoRAConfig
from cgc_lora_jax.params import count_parameters, freeze_base, join_params, split_params, trainable_mask
from cgc_lora_jax.sharding import ADAPTER_RULES, make_mesh, match_partition_rules, named_shardings
from test_layers import MODES, randomize_adapters, rel_err
from test_merge import TASKS, TwoLayers

# (d_in, d_out) of TwoLayers' adapted layers for x of width 12.
ADAPTED = {"dense_h_to_4h": (12, 32), "dense_4h_to_h": (32, 16), "head": (16, 8)}


def init(cfg):
    x = jax.random.normal(jax.random.key(7), (len(TASKS), 3, 12))
    return x, TwoLayers(cfg).init(jax.random.key(0), x, jnp.asarray(TASKS))["params"]


def gate_count(cfg: CGCLoRAConfig) -> int:
    if cfg.gate == "uniform":
        return 0
    per_gate = cfg.task_embed_dim * (cfg.num_tasks + cfg.num_common + (cfg.num_tasks if cfg.specific_rank else 0))
    return per_gate * (len(ADAPTED) if cfg.gate == "per_layer" else 1)


@pytest.mark.parametrize("mode", MODES)
def test_trainable_count_is_plain_lora_plus_gate(mode):
    cfg = MODES[mode]
    _, params = init(cfg)
    trainable, total = count_parameters(params)
    plain_lora = sum(cfg.total_rank * (d_in + d_out) for d_in, d_out in ADAPTED.values())
    assert trainable == plain_lora + gate_count(cfg)
    base = sum(d_in * d_out for d_in, d_out in ADAPTED.values()) + 32 + 8  # kernels + biases
    assert total == base + trainable


def test_split_join_round_trip_and_mask():
    _, params = init(MODES["per_layer"])
    base, adapters = split_params(params)
    flat_base, flat_adapters = (traverse_util.flatten_dict(t, sep="/") for t in (base, adapters))
    assert all(p.endswith(("kernel", "bias")) and "lora" not in p for p in flat_base)
    assert flat_adapters and all("/lora/" in p for p in flat_adapters)
    jax.tree.map(np.testing.assert_array_equal, join_params(base, adapters), params)
    mask = traverse_util.flatten_dict(trainable_mask(params), sep="/")
    assert {p for p, m in mask.items() if m} == set(flat_adapters)
    with pytest.raises(ValueError, match="in both"):
        join_params(base, base)


def test_gradients_only_for_adapters_and_one_step_changes_output():
    cfg = MODES["shared"]
    x, params = init(cfg)
    model = TwoLayers(cfg)
    base, adapters = split_params(params)
    target = jax.random.normal(jax.random.key(9), (len(TASKS), 3, 8))

    def loss_fn(adapters):
        y = model.apply({"params": join_params(base, adapters)}, x, jnp.asarray(TASKS))
        return jnp.mean((y - target) ** 2)

    grads = jax.grad(loss_fn)(adapters)
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)
    assert any(np.any(g) for g in jax.tree.leaves(grads))

    # The masked optimizer over the whole tree: the base gets exactly zero updates.
    full_grads = jax.grad(lambda p: jnp.mean((model.apply({"params": p}, x, jnp.asarray(TASKS)) - target) ** 2))(params)
    tx = freeze_base(optax.adamw(1e-2), params)
    state = tx.init(params)
    updates, _ = tx.update(full_grads, state, params)
    new_params = optax.apply_updates(params, updates)
    new_base, new_adapters = split_params(new_params)
    jax.tree.map(np.testing.assert_array_equal, new_base, base)
    assert np.any(new_adapters["dense_h_to_4h"]["lora"]["B"])  # B moved off zero
    before = model.apply({"params": params}, x, jnp.asarray(TASKS))
    after = model.apply({"params": new_params}, x, jnp.asarray(TASKS))
    assert not np.allclose(before, after)
    assert loss_fn(split_params(new_params)[1]) < loss_fn(adapters)


def test_sharded_over_8_devices_equals_one_device():
    assert jax.device_count() >= 8, "tests/conftest.py sets 8 fake CPU devices"
    cfg = MODES["shared"]
    x, params = init(cfg)
    params = randomize_adapters(params)
    model = TwoLayers(cfg)
    rules = (
        (r"dense_h_to_4h/kernel$", P("fsdp", "tensor")),
        (r"dense_4h_to_h/kernel$", P("tensor", "fsdp")),
        *ADAPTER_RULES,
        (r".*", P()),
    )
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = named_shardings(mesh, match_partition_rules(rules, params))
    sharded_params = jax.device_put(params, shardings)
    assert sharded_params["dense_h_to_4h"]["kernel"].sharding.spec == P("fsdp", "tensor")
    x_sharded = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
    tasks = jax.device_put(jnp.asarray(TASKS), NamedSharding(mesh, P(("data", "fsdp"))))

    def loss_and_grad(p, x, t):
        return jax.value_and_grad(lambda a: jnp.sum(model.apply({"params": join_params(split_params(p)[0], a)}, x, t) ** 2))(
            split_params(p)[1]
        )

    single = jax.jit(loss_and_grad)(params, x, jnp.asarray(TASKS))
    sharded = jax.jit(loss_and_grad)(sharded_params, x_sharded, tasks)
    np.testing.assert_allclose(sharded[0], single[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(sharded[1]), jax.tree.leaves(single[1])):
        assert rel_err(a, b) <= 1e-5  # relative to the largest entry: sums reorder across devices
    y_single = model.apply({"params": params}, x, jnp.asarray(TASKS))
    y_sharded = jax.jit(model.apply)({"params": sharded_params}, x_sharded, tasks)
    assert rel_err(y_sharded, y_single) <= 1e-6


def test_partition_rules_reject_unmatched_paths():
    _, params = init(MODES["shared"])
    with pytest.raises(ValueError, match="no partition rule matches parameter 'dense_h_to_4h/kernel'"):
        match_partition_rules(ADAPTER_RULES, params)
    with pytest.raises(ValueError, match="mesh shape"):
        make_mesh({"data": 16})
