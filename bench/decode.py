"""Greedy decoding throughput: our jit generate (models/generate.py) vs transformers' generate.

Parts: "tiny", the same tiny random Llama in both (float32, CPU): batch 4, 32-token prompts, 64
new tokens, no eos; "real", SmolLM2-135M shapes (bench/_smollm2.py, random weights): batch 32,
64-token prompts, 64 new tokens, float32 on both sides (greedy ids compared); --real-bf16 adds ours
in bfloat16 (greedy ids compared with transformers' float32 ones).
Both are warmed up first (ours compiles once); each then runs `--runs` times and the median wall
time counts. tokens/s = batch * new tokens / seconds, prefill included. torch runs with `--threads`
intra-op threads and, as a second row, with one: on a small shared machine torch's thread pool can
be far slower than one thread, and the single-thread row shows how much of the ratio that is.
Prints a side-by-side table, then, last, one JSON line with decode_speedup_vs_torch = our tokens/s
over transformers' tokens/s at `--threads` (and ..._1_thread); real_decode_speedup_vs_torch the same
on the real shapes.

    python bench/decode.py [--parts tiny,real] [--runs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import traverse_util  # noqa: E402

from cgc_lora_jax.models.generate import generate  # noqa: E402
from cgc_lora_jax.models.llama import LlamaConfig, LlamaForCausalLM, key_map  # noqa: E402

SIZES = dict(
    vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
)


def tiny_models(seed: int = 0):
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES, pad_token_id=0)).eval()
    cfg = LlamaConfig.from_hf(hf.config.to_dict())
    state = hf.state_dict()
    flat = {path: jnp.asarray(state[name].numpy().T if t else state[name].numpy())
            for name, (path, t) in key_map(cfg).items()}
    return hf, LlamaForCausalLM(cfg), traverse_util.unflatten_dict(flat)


def median_seconds(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(hf, model, params, ids: np.ndarray, new: int, runs: int, threads: int, dtype=jnp.float32) -> dict:
    """Median seconds of our generate (params cast to `dtype`) and of transformers' (float32 at
    `threads` threads, and at 1 thread), greedy, `new` tokens per row, no eos; and the fraction
    of our greedy ids equal to transformers'."""
    mask = np.ones_like(ids)
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    if dtype != jnp.float32:
        model = model.clone(dtype=dtype, param_dtype=dtype)

    def ours():
        return np.asarray(generate(model, params, ids, mask, max_new_tokens=new, eos_token_id=None, pad_token_id=0))

    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)

    def theirs():
        with torch.no_grad():
            out = hf.generate(input_ids=ids_t, attention_mask=mask_t, do_sample=False, pad_token_id=0,
                              max_new_tokens=new, min_new_tokens=new)
        return out[:, ids.shape[1]:].numpy()

    torch.set_num_threads(threads)
    ours_ids, theirs_ids = ours(), theirs()  # warm-up (ours compiles here)
    ours_s, theirs_s = median_seconds(ours, runs), median_seconds(theirs, runs)
    torch.set_num_threads(1)
    theirs()
    one_thread_s = median_seconds(theirs, runs)
    torch.set_num_threads(threads)
    return {"ours_s": ours_s, "torch_s": theirs_s, "torch_1_thread_s": one_thread_s,
            "match": float(np.mean(ours_ids == theirs_ids))}


def print_rows(title: str, r: dict, tokens: int, threads: int):
    print(title)
    print(f"{'implementation':<28}{'seconds':>10}{'tokens/s':>12}{'ours x':>9}")
    rows = [("jax jit generate (ours)", r["ours_s"]), (f"transformers, {threads} threads", r["torch_s"]),
            ("transformers, 1 thread", r["torch_1_thread_s"])]
    for name, seconds in rows:
        print(f"{name:<28}{seconds:>10.4f}{tokens / seconds:>12.1f}{seconds / r['ours_s']:>9.2f}")


def bench_tiny(args) -> dict:
    hf, model, params = tiny_models()
    ids = np.random.default_rng(0).integers(3, SIZES["vocab_size"], (args.batch, args.prompt))
    r = compare(hf, model, params, ids, args.new, args.runs, args.threads)
    tokens = args.batch * args.new
    print_rows(f"Llama hidden {SIZES['hidden_size']}, {SIZES['num_hidden_layers']} layers, batch {args.batch}, "
               f"prompt {args.prompt}, {args.new} new tokens, float32, {jax.devices()[0].platform}, "
               f"torch threads {args.threads}, median of {args.runs}", r, tokens, args.threads)
    return {
        "decode_tokens_per_s_ours": round(tokens / r["ours_s"], 1),
        "decode_tokens_per_s_torch": round(tokens / r["torch_s"], 1),
        "decode_speedup_vs_torch": round(r["torch_s"] / r["ours_s"], 2),
        "decode_speedup_vs_torch_1_thread": round(r["torch_1_thread_s"] / r["ours_s"], 2),
        "greedy_ids_match_fraction": r["match"],
    }


def bench_real(args) -> dict:
    """SmolLM2-135M shapes (random weights): float32 both sides, and ours in bfloat16."""
    from bench._smollm2 import random_smollm2

    hf, cfg, params = random_smollm2()
    model = LlamaForCausalLM(cfg)
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (args.real_batch, args.real_prompt))
    tokens = args.real_batch * args.real_new
    out = {}
    for name, dtype in (("f32", jnp.float32), ("bf16", jnp.bfloat16)):
        if name == "bf16" and not args.real_bf16:
            continue
        r = compare(hf, model, params, ids, args.real_new, args.runs, args.threads, dtype)
        print_rows(f"\nSmolLM2-135M shapes (random), batch {args.real_batch}, prompt {args.real_prompt}, "
                   f"{args.real_new} new tokens, ours {name} vs transformers float32, greedy ids equal: "
                   f"{r['match']:.3f}", r, tokens, args.threads)
        suffix = "" if name == "f32" else "_bf16"
        out.update({f"real_decode_speedup_vs_torch{suffix}": round(r["torch_s"] / r["ours_s"], 2),
                    f"real_decode_tokens_per_s_ours{suffix}": round(tokens / r["ours_s"], 1),
                    f"real_greedy_ids_match_fraction{suffix}": r["match"]})
        out["real_decode_tokens_per_s_torch"] = round(tokens / r["torch_s"], 1)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="tiny,real", help="comma-separated: tiny, real (SmolLM2-135M shapes)")
    parser.add_argument("--batch", type=int, default=4, help="rows per generate call (tiny)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt length in tokens (tiny)")
    parser.add_argument("--new", type=int, default=64, help="new tokens per row (tiny)")
    parser.add_argument("--real-batch", type=int, default=32, help="rows per generate call (real)")
    parser.add_argument("--real-prompt", type=int, default=64, help="prompt length in tokens (real)")
    parser.add_argument("--real-new", type=int, default=64, help="new tokens per row (real)")
    parser.add_argument("--real-bf16", action="store_true", help="also our bfloat16 row (real)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per side (median taken)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    if parts - {"tiny", "real"}:
        parser.error(f"--parts {args.parts}: unknown {sorted(parts - {'tiny', 'real'})}")
    result = {"torch_threads": args.threads, "cpu_count": os.cpu_count()}
    if "tiny" in parts:
        result.update(bench_tiny(args))
    if "real" in parts:
        result.update(bench_real(args))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
