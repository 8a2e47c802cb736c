"""A one-minute tour of CGC-LoRA on a toy multi-task problem (no model download needed).

A frozen random two-layer network plays the base model. Each of 4 tasks wants a different
low-rank change of it: a change common to all tasks plus a change of its own. CGC-LoRA adapters
(4 common experts, one specific expert per task, a shared task gate) are trained on mixed-task
batches with the base frozen; then each task's experts are merged into plain weights and the
merged model is checked against the adapted one.

    python examples/layer_demo.py
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cgc_lora_jax.layers import CGCLoRAConfig, Dense, TaskRouting
from cgc_lora_jax.merge import merge_task
from cgc_lora_jax.params import count_parameters, join_params, split_params

NUM_TASKS, D, STEPS = 4, 64, 300


class Toy(nn.Module):
    lora: CGCLoRAConfig | None

    @nn.compact
    def __call__(self, x, task_ids=None):
        adapters = TaskRouting(self.lora, name="task_gate")(task_ids, x.shape[0]) if self.lora else None
        h = nn.gelu(Dense(4 * D, lora=self.lora, name="dense_h_to_4h")(x, adapters))
        return Dense(D, lora=self.lora, name="dense_4h_to_h")(h, adapters)


def main():
    cfg = CGCLoRAConfig(num_tasks=NUM_TASKS, num_common=4, common_rank=2, specific_rank=2, alpha=16.0)
    key = jax.random.key(0)
    x_all = jax.random.normal(key, (2048, D))
    tasks_all = jnp.arange(2048) % NUM_TASKS

    # The tasks' "true" models: the base plus a common and a task-specific rank-2 change.
    base_params = Toy(None).init(key, x_all[:1])["params"]
    rng = np.random.default_rng(0)
    common = rng.normal(size=(D, 2)) @ rng.normal(size=(2, 4 * D)) * 0.05
    teachers = []
    for t in range(NUM_TASKS):
        own = rng.normal(size=(D, 2)) @ rng.normal(size=(2, 4 * D)) * 0.05
        p = jax.tree.map(lambda a: a, base_params)
        p["dense_h_to_4h"] = {**p["dense_h_to_4h"], "kernel": p["dense_h_to_4h"]["kernel"] + common + own}
        teachers.append(p)
    y_all = jnp.stack([Toy(None).apply({"params": teachers[t]}, x_all) for t in range(NUM_TASKS)])
    y_all = y_all[tasks_all, jnp.arange(2048)]

    model = Toy(cfg)
    params = model.init(key, x_all[:1], tasks_all[:1])["params"]
    params = {**params, "dense_h_to_4h": {**params["dense_h_to_4h"], **base_params["dense_h_to_4h"]},
              "dense_4h_to_h": {**params["dense_4h_to_h"], **base_params["dense_4h_to_h"]}}
    base, adapters = split_params(params)
    trainable, total = count_parameters(params)
    print(f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.2%})")

    def loss_fn(adapters, x, t, y):
        pred = model.apply({"params": join_params(base, adapters)}, x, t)
        return jnp.mean((pred - y) ** 2)

    tx = optax.adam(3e-3)
    opt_state = tx.init(adapters)

    @jax.jit
    def step(adapters, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(adapters, *batch)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(adapters, updates), opt_state, loss

    for i in range(STEPS):
        idx = (jnp.arange(128) + 128 * i) % 2048  # mixed-task batches
        adapters, opt_state, loss = step(adapters, opt_state, (x_all[idx], tasks_all[idx], y_all[idx]))
        if i in (0, STEPS - 1) or i % 100 == 0:
            print(f"step {i:4d}  loss {float(loss):.5f}")

    params = join_params(base, adapters)
    adapted = model.apply({"params": params}, x_all, tasks_all)
    print("task  mse(adapted)  max|merged - adapted|")
    for t in range(NUM_TASKS):
        rows = np.flatnonzero(np.asarray(tasks_all) == t)
        merged = Toy(None).apply({"params": merge_task(params, t, cfg)}, x_all[rows])
        mse = float(jnp.mean((adapted[rows] - y_all[rows]) ** 2))
        print(f"{t:4d}  {mse:12.5f}  {float(jnp.max(jnp.abs(merged - adapted[rows]))):.2e}")


if __name__ == "__main__":
    main()
