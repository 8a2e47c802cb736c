"""Step time of a stack of ChatGLM-shaped dense layers: floor vs LoRA vs CGC-LoRA fused vs loop.

Each block is query_key_value (d -> 3d), dense (d -> d), dense_h_to_4h (d -> 4d) and
dense_4h_to_h (4d -> d), with a nonlinearity between them. One training step is forward +
backward of a scalar loss:
  floor      frozen base only, gradient with respect to the input activations
  lora       plain LoRA of total rank r on every layer, gradient for the adapters
  cgc_fused  CGC-LoRA (N_c common + one specific expert per task, mixed-task batch), fused
  cgc_loop   the same CGC-LoRA computed with a Python loop over experts (MOELoRA's way)
The variants run interleaved, round after round, and the median per variant is reported, so
machine noise hits all of them alike. Prints a table, then one JSON line of the ratios.

    python bench/layers.py                     # d=1024, 2 blocks, 2048 tokens
    python bench/layers.py --d 256 --rounds 3  # a quick smoke run
"""

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from bench._common import interleaved_medians  # noqa: E402
from cgc_lora_jax.layers import CGCLoRAConfig, cgc_lora_dense, gate_weights  # noqa: E402

SHAPES = ((1, 3), (1, 1), (1, 4), (4, 1))  # (d_in, d_out) of the four layers, in units of d


def init(args):
    key = iter(jax.random.split(jax.random.key(0), 1000))
    d, cfg = args.d, CGCLoRAConfig(
        num_tasks=args.tasks, num_common=args.num_common, common_rank=args.rank, specific_rank=args.rank,
        task_embed_dim=64,
    )
    normal = lambda shape, std: std * jax.random.normal(next(key), shape, jnp.float32)
    base, lora = [], []
    for _ in range(args.blocks):
        for i, o in SHAPES:
            base.append({"kernel": normal((i * d, o * d), (i * d) ** -0.5), "bias": normal((o * d,), 0.02)})
            # B is random (not zero) so no variant can skip work on zeros.
            lora.append({"A": normal((i * d, cfg.total_rank), 0.02), "B": normal((cfg.total_rank, o * d), 0.02)})
    gate = {
        "task_embedding": normal((64, cfg.num_tasks), 1.0),
        "common": normal((64, cfg.num_common), 0.1),
        "specific": normal((64, cfg.num_tasks), 0.1),
    }
    x = normal((args.batch, args.seq, d), 1.0)
    task_ids = jnp.arange(args.batch, dtype=jnp.int32) % cfg.num_tasks
    return cfg, base, lora, gate, x, task_ids


def stack(layer_fn, x, base):
    h = x
    for b, layer in enumerate(base):
        y = layer_fn(b, h, layer)
        if b % 4 == 0:  # a stand-in for attention: fold q, k, v back to width d
            y = jnp.tanh(y[..., : y.shape[-1] // 3]) * y[..., y.shape[-1] // 3 : 2 * y.shape[-1] // 3] + y[..., 2 * y.shape[-1] // 3 :]
        h = jax.nn.gelu(y) if b % 4 == 2 else y  # gelu after dense_h_to_4h, like GLM's MLP
    return jnp.mean(h.astype(jnp.float32) ** 2)


def make_steps(cfg: CGCLoRAConfig):
    s, nc, rc, rs = cfg.scaling, cfg.num_common, cfg.common_rank, cfg.specific_rank

    def dense(h, layer):
        return jnp.einsum("bti,io->bto", h, layer["kernel"]) + layer["bias"]

    def floor(base, lora, gate, x, task_ids):
        return jax.grad(lambda x: stack(lambda b, h, layer: dense(h, layer), x, base))(x)

    def lora_step(base, lora, gate, x, task_ids):
        def loss(lora):
            return stack(lambda b, h, layer: dense(h, layer) + s * (h @ lora[b]["A"]) @ lora[b]["B"], x, base)
        return jax.grad(loss)(lora)

    def cgc_fused(base, lora, gate, x, task_ids):
        def loss(lora, gate):
            w = gate_weights(gate, task_ids, cfg)
            fn = lambda b, h, layer: cgc_lora_dense(h, layer["kernel"], lora[b], w, task_ids, cfg, layer["bias"])
            return stack(fn, x, base)
        return jax.grad(loss, argnums=(0, 1))(lora, gate)

    def cgc_loop(base, lora, gate, x, task_ids):
        def loss(lora, gate):
            w = gate_weights(gate, task_ids, cfg)

            def layer_fn(b, h, layer):
                y = dense(h, layer)
                a, bb = lora[b]["A"], lora[b]["B"]
                for i in range(nc):  # one matmul pair per common expert
                    cols = slice(i * rc, (i + 1) * rc)
                    y = y + s * w[:, i, None, None] * ((h @ a[:, cols]) @ bb[cols])
                for t in range(cfg.num_tasks):  # one per task-specific expert, masked to its rows
                    cols = slice(nc * rc + t * rs, nc * rc + (t + 1) * rs)
                    own = jnp.where(task_ids == t, w[:, -1], 0.0)[:, None, None]
                    y = y + s * own * ((h @ a[:, cols]) @ bb[cols])
                return y

            return stack(layer_fn, x, base)
        return jax.grad(loss, argnums=(0, 1))(lora, gate)

    return {"floor": floor, "lora": lora_step, "cgc_fused": cgc_fused, "cgc_loop": cgc_loop}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=1024, help="model width")
    parser.add_argument("--blocks", type=int, default=2, help="ChatGLM-shaped blocks of four layers")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--tasks", type=int, default=8, help="tasks (one specific expert each)")
    parser.add_argument("--num-common", type=int, default=8, help="common experts N_c")
    parser.add_argument("--rank", type=int, default=2, help="rank per expert")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per variant")
    args = parser.parse_args()

    cfg, base, lora, gate, x, task_ids = init(args)
    # Plain LoRA of the same total rank: the first total_rank columns are all of A / B.
    steps = {name: jax.jit(fn) for name, fn in make_steps(cfg).items()}
    inputs = (base, lora, gate, x, task_ids)
    calls = {name: (lambda fn=fn: fn(*inputs)) for name, fn in steps.items()}
    med = interleaved_medians(calls, args.rounds, warmup=1, wait=jax.block_until_ready)  # warmup compiles

    tokens = args.batch * args.seq
    print(f"d={args.d} blocks={args.blocks} tokens/step={tokens} total rank={cfg.total_rank} "
          f"(N_c={cfg.num_common} x r={cfg.common_rank} + {cfg.num_tasks} tasks x r={cfg.specific_rank}) "
          f"devices={jax.devices()[0].platform} x{jax.device_count()}")
    print(f"{'variant':<11} {'step ms':>9} {'tokens/s':>10} {'/ floor':>8} {'/ lora':>8}")
    for name, t in med.items():
        print(f"{name:<11} {t * 1e3:9.1f} {tokens / t:10.0f} {t / med['floor']:8.3f} {t / med['lora']:8.3f}")
    figures = {
        "cgc_over_lora": med["cgc_fused"] / med["lora"],
        "cgc_over_floor": med["cgc_fused"] / med["floor"],
        "fused_over_loop": med["cgc_fused"] / med["cgc_loop"],
        "step_ms": {k: v * 1e3 for k, v in med.items()},
        "d": args.d, "blocks": args.blocks, "tokens_per_step": tokens, "total_rank": cfg.total_rank,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
