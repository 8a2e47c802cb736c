"""merge_task and task_lora_factors: merged == unmerged for every task and gate mode."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgc_lora_jax.layers import CGCLoRAConfig, Dense, TaskRouting
from cgc_lora_jax.merge import merge_task, task_lora_factors
from test_layers import MODES, numpy_reference, randomize_adapters, rel_err

TASKS = np.array([2, 0, 1, 1, 0, 2, 2, 1], np.int32)


class TwoLayers(nn.Module):
    """Two adapted layers and one untargeted one, like a tiny MLP block."""

    cfg: CGCLoRAConfig | None

    @nn.compact
    def __call__(self, x, task_ids):
        adapters = None
        if self.cfg is not None:
            adapters = TaskRouting(self.cfg, name="task_gate")(task_ids, x.shape[0])
        h = nn.gelu(Dense(32, lora=self.cfg, name="dense_h_to_4h")(x, adapters))
        h = Dense(16, use_bias=False, lora=self.cfg, name="dense_4h_to_h")(h, adapters)
        return Dense(8, lora=self.cfg, name="head")(h, adapters)


def setup(mode):
    cfg = MODES[mode]
    if mode == "shared":  # leave one layer untargeted to show merging skips it
        cfg = CGCLoRAConfig(**{**cfg.__dict__, "targets": "dense_"})
    x = jax.random.normal(jax.random.key(7), (len(TASKS), 3, 12))
    params = TwoLayers(cfg).init(jax.random.key(0), x, jnp.asarray(TASKS))["params"]
    return cfg, x, randomize_adapters(params)


@pytest.mark.parametrize("mode", MODES)
def test_merged_equals_unmerged_for_every_task(mode):
    cfg, x, params = setup(mode)
    unmerged = TwoLayers(cfg).apply({"params": params}, x, jnp.asarray(TASKS))
    merge = jax.jit(merge_task, static_argnums=2)
    for task in range(cfg.num_tasks):
        merged = merge(params, jnp.int32(task), cfg)
        assert "task_gate" not in merged
        assert all(set(layer) <= {"kernel", "bias"} for layer in merged.values())
        rows = np.flatnonzero(TASKS == task)
        plain = TwoLayers(None).apply({"params": merged}, x[rows], None)
        assert rel_err(plain, unmerged[rows]) <= 1e-5, (mode, task)


def test_merge_leaves_untargeted_layers_and_input_untouched():
    cfg, _, params = setup("shared")
    before = jax.tree.map(np.array, params)
    merged = merge_task(params, 1, cfg)
    np.testing.assert_array_equal(merged["head"]["kernel"], params["head"]["kernel"])
    jax.tree.map(np.testing.assert_array_equal, params, before)  # pure: input unchanged


@pytest.mark.parametrize("mode", MODES)
def test_task_lora_factors_reproduce_delta_w(mode):
    cfg, _, params = setup(mode)
    for task in range(cfg.num_tasks):
        merged = merge_task(params, task, cfg)
        factors = task_lora_factors(params, task, cfg)
        assert set(factors) == {p for p, layer in params.items() if "lora" in layer}
        for path, (a, b) in factors.items():
            assert a.shape[1] == b.shape[0] == cfg.task_rank
            delta = np.asarray(merged[path]["kernel"], np.float64) - np.asarray(params[path]["kernel"], np.float64)
            np.testing.assert_allclose(np.asarray(a, np.float64) @ np.asarray(b, np.float64), delta, rtol=1e-4, atol=1e-5)


def test_factors_against_float64_numpy():
    """A'B' applied to x equals eq. 4-7's adapter term computed in float64 with loops."""
    from test_layers import OneLayer

    cfg = MODES["shared"]
    x = jax.random.normal(jax.random.key(1), (len(TASKS), 24))
    params = randomize_adapters(OneLayer(cfg).init(jax.random.key(0), x, jnp.asarray(TASKS))["params"])
    base = np.asarray(x, np.float64) @ np.asarray(params["query_key_value"]["kernel"], np.float64) + np.asarray(
        params["query_key_value"]["bias"], np.float64
    )
    ref = numpy_reference(x, params, cfg, TASKS)
    for task in range(cfg.num_tasks):
        a, b = task_lora_factors(params, task, cfg)["query_key_value"]
        rows = TASKS == task
        got = base[rows] + np.asarray(x, np.float64)[rows] @ np.asarray(a, np.float64) @ np.asarray(b, np.float64)
        assert rel_err(got, ref[rows]) <= 1e-5
