"""cgc_lora_jax.layers against an independent float64 numpy implementation of paper eq. 4-7."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cgc_lora_jax.params import join_params, split_params
from cgc_lora_jax.layers import (
    AdapterInputs,
    CGCLoRAConfig,
    Dense,
    TaskRouting,
    cgc_lora_dense,
    gate_weights,
    init_adapters,
    uniform_weights,
)
from conftest import rel_err

D_IN, D_OUT, BATCH, SEQ = 24, 20, 6, 5
TASKS = np.array([0, 2, 1, 2, 0, 1], np.int32)  # a mixed-task batch

MODES = {
    "shared": CGCLoRAConfig(num_tasks=3, num_common=4, common_rank=2, specific_rank=3, task_embed_dim=8),
    "per_layer": CGCLoRAConfig(num_tasks=3, num_common=4, common_rank=2, specific_rank=3, gate="per_layer", task_embed_dim=8),
    "uniform": CGCLoRAConfig(num_tasks=3, num_common=4, common_rank=2, specific_rank=3, gate="uniform"),
    "lora_full": CGCLoRAConfig.lora_full(3, rank=8),
    "lora_single": CGCLoRAConfig.lora_single(3, rank=4),
    "moe_lora": CGCLoRAConfig.moe_lora(3, num_experts=4, rank=2, task_embed_dim=8),
}


class OneLayer(nn.Module):
    cfg: CGCLoRAConfig | None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, task_ids, deterministic=True):
        adapters = None
        if self.cfg is not None:
            adapters = TaskRouting(self.cfg, name="task_gate")(task_ids, x.shape[0])
        return Dense(D_OUT, lora=self.cfg, param_dtype=self.param_dtype, name="query_key_value")(
            x, adapters, deterministic
        )


def randomize_adapters(params, seed=1):
    """B starts at zero; give every adapter leaf random values so the experts matter."""
    flat = traverse_util.flatten_dict(params)
    rng = np.random.default_rng(seed)
    for path, leaf in flat.items():
        if "lora" in path or "task_gate" in path:
            flat[path] = jnp.asarray(rng.normal(size=leaf.shape), leaf.dtype)
    return traverse_util.unflatten_dict(flat)


def init(cfg, x, **kw):
    module = OneLayer(cfg, **kw)
    params = module.init(jax.random.key(0), x, jnp.asarray(TASKS))["params"]
    return module, params


def numpy_reference(x, params, cfg: CGCLoRAConfig, task_ids):
    """Eq. 4-7 in float64 with explicit loops over samples and experts."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["query_key_value"])
    lora = p["lora"]
    gate = p.get("lora", {}).get("gate") if cfg.gate == "per_layer" else params.get("task_gate")
    if gate is not None:
        gate = jax.tree.map(lambda a: np.asarray(a, np.float64), gate)
    x = np.asarray(x, np.float64)
    out = x @ p["kernel"] + p["bias"]
    rc, rs, nc = cfg.common_rank, cfg.specific_rank, cfg.num_common
    for b, t in enumerate(task_ids):
        if cfg.gate == "uniform":
            w = np.full(cfg.num_slots, 1.0 / cfg.num_slots)
        else:
            e = gate["task_embedding"][:, t]
            logits = list(e @ gate["common"]) if nc else []
            if rs:
                logits.append(e @ gate["specific"][:, t])
            logits = np.array(logits)
            w = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        experts = [(w[i], slice(i * rc, (i + 1) * rc)) for i in range(nc)]
        if rs:
            start = nc * rc + t * rs
            experts.append((w[-1], slice(start, start + rs)))
        for w_i, cols in experts:
            out[b] += cfg.scaling * w_i * (x[b] @ lora["A"][:, cols]) @ lora["B"][cols]
    return out


@pytest.fixture
def x():
    return jax.random.normal(jax.random.key(42), (BATCH, SEQ, D_IN), jnp.float32)


@pytest.mark.parametrize("mode", MODES)
def test_zero_b_gives_exact_base_output(mode, x):
    _, params = init(MODES[mode], x)
    assert not np.any(params["query_key_value"]["lora"]["B"])
    adapted = OneLayer(MODES[mode]).apply({"params": params}, x, jnp.asarray(TASKS))
    plain = OneLayer(None).apply({"params": {"query_key_value": {k: params["query_key_value"][k] for k in ("kernel", "bias")}}}, x, None)
    np.testing.assert_array_equal(adapted, plain)
    flax_dense = nn.Dense(D_OUT).apply({"params": {k: params["query_key_value"][k] for k in ("kernel", "bias")}}, x)
    np.testing.assert_allclose(adapted, flax_dense, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_matches_float64_numpy(mode, x):
    cfg = MODES[mode]
    module, params = init(cfg, x)
    params = randomize_adapters(params)
    y = jax.jit(module.apply)({"params": params}, x, jnp.asarray(TASKS))
    assert rel_err(y, numpy_reference(x, params, cfg, TASKS)) <= 1e-5


@pytest.mark.parametrize("mode", ["shared", "per_layer", "uniform"])
def test_other_tasks_experts_contribute_exactly_zero(mode, x):
    cfg = MODES[mode]
    module, params = init(cfg, x)
    params = randomize_adapters(params)
    y = module.apply({"params": params}, x, jnp.asarray(TASKS))
    # Blow up task 2's specific expert: rows of tasks 0 and 1 must not move at all.
    lora = params["query_key_value"]["lora"]
    start = cfg.num_common * cfg.common_rank + 2 * cfg.specific_rank
    lora["B"] = lora["B"].at[start : start + cfg.specific_rank].set(1e6)
    y2 = module.apply({"params": params}, x, jnp.asarray(TASKS))
    keep = TASKS != 2
    np.testing.assert_array_equal(y[keep], y2[keep])
    assert not np.allclose(y[~keep], y2[~keep])


def test_mixed_batch_equals_per_task_batches(x):
    cfg = MODES["shared"]
    module, params = init(cfg, x)
    params = randomize_adapters(params)
    mixed = module.apply({"params": params}, x, jnp.asarray(TASKS))
    for t in range(cfg.num_tasks):
        rows = np.flatnonzero(TASKS == t)
        alone = module.apply({"params": params}, x[rows], jnp.full(len(rows), t, jnp.int32))
        np.testing.assert_allclose(mixed[rows], alone, rtol=1e-6, atol=1e-6)


def test_gate_weights_are_a_softmax_over_common_and_own_slots():
    cfg = MODES["shared"]
    gate = randomize_adapters({"task_gate": {
        "task_embedding": jnp.zeros((8, 3)), "common": jnp.zeros((8, 4)), "specific": jnp.zeros((8, 3))}})["task_gate"]
    w = gate_weights(gate, jnp.asarray(TASKS), cfg)
    assert w.shape == (BATCH, cfg.num_slots)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
    # Same task -> same weights; different tasks -> different weights.
    np.testing.assert_array_equal(w[0], w[4])
    assert not np.allclose(w[0], w[1])
    np.testing.assert_array_equal(uniform_weights(jnp.asarray(TASKS), cfg), np.full((BATCH, 5), 0.2, np.float32))


def test_functional_form_equals_module_and_vmaps(x):
    cfg = MODES["shared"]
    module, params = init(cfg, x)
    params = randomize_adapters(params)
    layer = params["query_key_value"]
    weights = gate_weights(params["task_gate"], jnp.asarray(TASKS), cfg)
    y = cgc_lora_dense(x, layer["kernel"], layer["lora"], weights, jnp.asarray(TASKS), cfg, layer["bias"])
    np.testing.assert_allclose(y, module.apply({"params": params}, x, jnp.asarray(TASKS)), rtol=1e-6, atol=1e-6)
    # vmap over samples, each call seeing a batch of one.
    one = lambda xi, wi, ti: cgc_lora_dense(xi[None], layer["kernel"], layer["lora"], wi[None], ti[None], cfg, layer["bias"])[0]
    y_vmap = jax.vmap(one)(x, weights, jnp.asarray(TASKS))
    np.testing.assert_allclose(y_vmap, y, rtol=1e-6, atol=1e-6)


def test_remat_gives_same_values_and_gradients(x):
    cfg = MODES["per_layer"]
    module, params = init(cfg, x)
    params = randomize_adapters(params)

    class Remat(nn.Module):
        @nn.compact
        def __call__(self, x, task_ids):
            return nn.remat(OneLayer)(cfg, name="inner")(x, task_ids)

    remat_params = {"inner": params}

    def loss(m, p):
        return jnp.sum(jnp.sin(m.apply({"params": p}, x, jnp.asarray(TASKS))))

    g = jax.grad(lambda p: loss(module, p))(params)
    g_remat = jax.grad(lambda p: loss(Remat(), p))(remat_params)["inner"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g, g_remat)


def test_bf16_params_and_activations_accumulate_in_float32(x):
    cfg = MODES["shared"]
    module, params = init(cfg, x, param_dtype=jnp.bfloat16)
    assert params["query_key_value"]["kernel"].dtype == jnp.bfloat16
    assert params["query_key_value"]["lora"]["A"].dtype == jnp.float32  # float32 master weights
    assert params["task_gate"]["task_embedding"].dtype == jnp.float32
    params = randomize_adapters(params)
    y = module.apply({"params": params}, x.astype(jnp.bfloat16), jnp.asarray(TASKS))
    assert y.dtype == jnp.bfloat16
    ref = numpy_reference(np.asarray(x.astype(jnp.bfloat16), np.float32), params, cfg, TASKS)
    assert rel_err(y, ref) <= 2e-2


def test_dropout_touches_only_the_adapter_input(x):
    cfg = dataclasses.replace(MODES["shared"], dropout=0.5)
    module, params = init(cfg, x)
    base_out = module.apply({"params": params}, x, jnp.asarray(TASKS))  # B = 0
    dropped = module.apply({"params": params}, x, jnp.asarray(TASKS), False, rngs={"dropout": jax.random.key(3)})
    np.testing.assert_array_equal(dropped, base_out)  # with B = 0 dropout cannot reach the output
    params = randomize_adapters(params)
    run = lambda seed: module.apply({"params": params}, x, jnp.asarray(TASKS), False, rngs={"dropout": jax.random.key(seed)})
    assert not np.allclose(run(1), run(2))
    np.testing.assert_array_equal(run(1), run(1))


def test_untargeted_layer_stays_plain(x):
    cfg = dataclasses.replace(MODES["shared"], targets=r"dense_4h_to_h$")
    _, params = init(cfg, x)
    assert set(params["query_key_value"]) == {"kernel", "bias"}


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_tasks=0), "num_tasks"),
        (dict(num_tasks=2, gate="mixture"), "gate"),
        (dict(num_tasks=2, num_common=0, specific_rank=0), "num_common"),
        (dict(num_tasks=2, dropout=1.0), "dropout"),
        (dict(num_tasks=2, targets="("), "targets"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"CGCLoRAConfig\.{field}="):
        CGCLoRAConfig(**kwargs)


def test_missing_task_ids_is_a_clear_error(x):
    module, params = init(MODES["shared"], x)
    with pytest.raises(ValueError, match="pass task_ids"):
        module.apply({"params": params}, x, None)
    with pytest.raises(ValueError, match="task_ids has shape"):
        module.apply({"params": params}, x, jnp.zeros((2,), jnp.int32))


def test_bf16_backward_keeps_no_float32_copies_of_frozen_kernels():
    """XLA's own buffer plan for the gradient of a remat'd stack of bf16 adapted layers: the
    scratch memory must not grow by a float32 kernel copy per layer (that is what took a
    ChatGLM-6B-shaped CPU step from 2.4 GB to 25 GB of scratch)."""
    cfg = CGCLoRAConfig(num_tasks=2, num_common=2, common_rank=2, specific_rank=2, task_embed_dim=4)
    d = 512  # kernels of 0.5 MiB in bf16, 1 MiB as a float32 copy; activations of 8 KiB

    class Stack(nn.Module):
        layers: int

        @nn.compact
        def __call__(self, x, task_ids):
            adapters = TaskRouting(cfg, name="task_gate")(task_ids, x.shape[0])
            for i in range(self.layers):
                x = nn.remat(Dense)(d, lora=cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, name=f"dense_{i}")(x, adapters)
            return x

    def scratch(layers):
        model, x, t = Stack(layers), jnp.ones((2, 4, d), jnp.bfloat16), jnp.array([0, 1])
        params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t)["params"])
        base, adapters = split_params(params)
        loss = lambda a, b: jnp.sum(model.apply({"params": join_params(b, a)}, x, t).astype(jnp.float32))
        compiled = jax.jit(jax.grad(loss)).lower(adapters, base).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    growth_per_layer = (scratch(8) - scratch(2)) / 6
    assert growth_per_layer < 256 * 1024, f"{growth_per_layer / 2**20:.2f} MiB of scratch per layer"


def test_init_adapters_draws_each_leaf_from_its_path_and_the_modules_initializers():
    cfg = CGCLoRAConfig(num_tasks=3, num_common=2, common_rank=4, specific_rank=4, task_embed_dim=64, init_std=0.05)
    sds = jax.ShapeDtypeStruct
    abstract = {("l0", "lora", "A"): sds((256, 20), jnp.float32), ("l0", "lora", "B"): sds((20, 128), jnp.float32),
                ("task_gate", "task_embedding"): sds((64, 3), jnp.float32),
                ("task_gate", "common"): sds((64, 2), jnp.float32), ("task_gate", "specific"): sds((64, 3), jnp.float32)}
    values = {p: np.asarray(v) for p, v in init_adapters(abstract, cfg, seed=7).items()}
    assert {p: (v.shape, v.dtype) for p, v in values.items()} == {p: (a.shape, a.dtype) for p, a in abstract.items()}
    assert np.std(values[("l0", "lora", "A")]) == pytest.approx(0.05, rel=0.05)
    assert not np.any(values[("l0", "lora", "B")])
    assert np.std(values[("task_gate", "task_embedding")]) == pytest.approx(1.0, rel=0.25)
    assert np.std(values[("task_gate", "common")]) == pytest.approx(64**-0.5, rel=0.3)
    # a value depends on its path and the seed only: not on which other leaves are drawn
    alone = init_adapters({("l0", "lora", "A"): abstract[("l0", "lora", "A")]}, cfg, seed=7)
    np.testing.assert_array_equal(np.asarray(alone[("l0", "lora", "A")]), values[("l0", "lora", "A")])
    moved = init_adapters({("l1", "lora", "A"): abstract[("l0", "lora", "A")]}, cfg, seed=7)
    assert not np.array_equal(np.asarray(moved[("l1", "lora", "A")]), values[("l0", "lora", "A")])
    reseeded = init_adapters({("l0", "lora", "A"): abstract[("l0", "lora", "A")]}, cfg, seed=8)
    assert not np.array_equal(np.asarray(reseeded[("l0", "lora", "A")]), values[("l0", "lora", "A")])
    with pytest.raises(ValueError, match="l0/lora/C"):
        init_adapters({("l0", "lora", "C"): abstract[("l0", "lora", "A")]}, cfg, seed=7)
