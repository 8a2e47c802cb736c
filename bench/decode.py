"""Greedy decoding throughput: our jit generate (models/generate.py) vs transformers' generate.

Parts: "tiny", the same tiny random Llama in both (float32, CPU): batch 4, 32-token prompts, 64
new tokens, no eos, each side warmed up then the median of `--runs` calls; "real", SmolLM2-135M
shapes (bench/_smollm2.py, random weights): batch 32, 64-token prompts, 64 new tokens, no eos:
ours in float32 (and bfloat16 with --real-bf16), transformers in float32 at `--threads` intra-op
threads and at one, and transformers with bfloat16 weights, all in interleaved rounds (one call of
each per round after a warm-up round; medians), so a busy stretch of a shared machine slows all
alike. Greedy ids are compared with transformers' float32 ones. tokens/s = batch * new tokens /
seconds, prefill included.
"prefill" (--parts prefill): the prefill alone, generate's first call (model.decode over the
prompt into an empty cache, last-position logits), SmolLM2-135M shapes (random weights) at
--prefill-batch x --prefill-prompt tokens in --prefill-dtype (auto: bf16 where the CPU multiplies
it natively), two variants in interleaved rounds: "cache read", the cache's index traced (the
prompt attends over every cache slot, masked: before 2026-12-06), and "own keys", the index the
Python int 0 (models/blocks.py cached_attention: the prompt attends over its own keys alone, in
causal row blocks); both must pick the same next tokens.
Prints side-by-side tables, then, last, one JSON line: decode_speedup_vs_torch (tiny) and
real_decode_speedup_vs_torch (ours f32 over transformers f32), real_decode_speedup_vs_torch_bf16
(ours bf16 over transformers f32), real_decode_bf16_speedup_vs_torch_bf16, real_decode_best_vs_best
(each side's faster dtype); prefill_seconds per variant and prefill_speedup (cache read over own keys).

Both sides run after cgc_lora_jax.host_memory.reuse_freed_memory(), as eval.py and the server do
(torch's allocator benefits alike), unless --plain-malloc.

    python bench/decode.py [--parts tiny,real,prefill] [--runs 3] [--threads 2] [--torch-bf16 auto] [--plain-malloc]
"""

from __future__ import annotations

import argparse
import copy
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

from cgc_lora_jax.host_memory import reuse_freed_memory  # noqa: E402
from cgc_lora_jax.models.generate import generate  # noqa: E402
from cgc_lora_jax.models.llama import LlamaConfig, LlamaForCausalLM, key_map  # noqa: E402
from cgc_lora_jax.precision import cpu_has_native_bf16  # noqa: E402

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
    """SmolLM2-135M shapes (random weights): every variant in interleaved rounds (one call of
    each per round, medians), so a slower stretch of a shared machine hits all alike. Variants:
    ours in float32 (and bfloat16 with --real-bf16), transformers in float32 at --threads and at
    one thread, and transformers with bfloat16 weights (its fastest CPU setting or not: measured;
    --torch-bf16 auto leaves it out on a CPU without native bf16 matmuls, where torch's bf16
    decode runs at 1-2 GFLOP/s and one call would take minutes)."""

    from bench._common import interleaved_times
    from bench._smollm2 import random_smollm2

    hf, cfg, params = random_smollm2()
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (args.real_batch, args.real_prompt))
    mask = np.ones_like(ids)
    tokens = args.real_batch * args.real_new
    dtypes = {"f32": jnp.float32, **({"bf16": jnp.bfloat16} if args.real_bf16 else {})}

    def ours(dtype):
        model = LlamaForCausalLM(cfg).clone(dtype=dtype, param_dtype=dtype)
        cast = jax.tree.map(lambda a: a.astype(dtype), params)
        return lambda: np.asarray(generate(model, cast, ids, mask, max_new_tokens=args.real_new,
                                           eos_token_id=None, pad_token_id=0))

    torch_bf16 = args.torch_bf16 == "yes" or (args.torch_bf16 == "auto" and cpu_has_native_bf16())
    if not torch_bf16:
        print("transformers bf16: left out (--torch-bf16 no, or auto on a CPU without native bf16 matmuls)")
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)

    def theirs(model, threads):
        def call():
            torch.set_num_threads(threads)
            with torch.no_grad():
                out = model.generate(input_ids=ids_t, attention_mask=mask_t, do_sample=False, pad_token_id=0,
                                     max_new_tokens=args.real_new, min_new_tokens=args.real_new)
            return out[:, ids.shape[1]:].numpy()
        return call

    variants = {f"ours {name}": ours(dtype) for name, dtype in dtypes.items()}
    variants.update({"transformers f32": theirs(hf, args.threads), "transformers f32 1 thread": theirs(hf, 1)})
    if torch_bf16:
        variants["transformers bf16"] = theirs(copy.deepcopy(hf).to(torch.bfloat16), args.threads)
    reference = variants["transformers f32"]()
    match = {name: float(np.mean(variants[f"ours {name}"]() == reference)) for name in dtypes}
    times = interleaved_times(variants, rounds=args.runs, warmup=1)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    torch.set_num_threads(args.threads)

    print(f"\nSmolLM2-135M shapes (random), batch {args.real_batch}, prompt {args.real_prompt}, {args.real_new} new "
          f"tokens, greedy, median of {args.runs} interleaved rounds; transformers at {args.threads} threads "
          f"unless said; greedy ids equal to transformers f32: "
          + ", ".join(f"ours {n} {m:.3f}" for n, m in match.items()))
    print(f"{'implementation':<28}{'seconds':>10}{'tokens/s':>12}")
    for name, t in seconds.items():
        print(f"{name:<28}{t:>10.3f}{tokens / t:>12.1f}")
    best_torch = min(seconds[k] for k in ("transformers f32", "transformers bf16") if k in seconds)
    out = {"real_decode_tokens_per_s": {name: round(tokens / t, 1) for name, t in seconds.items()},
           "real_decode_tokens_per_s_torch": round(tokens / seconds["transformers f32"], 1),
           "real_decode_speedup_vs_torch": round(seconds["transformers f32"] / seconds["ours f32"], 2),
           "real_greedy_ids_match_fraction": match["f32"]}
    if "bf16" in dtypes:
        out.update({"real_decode_speedup_vs_torch_bf16": round(seconds["transformers f32"] / seconds["ours bf16"], 2),
                    "real_decode_best_vs_best": round(best_torch / min(seconds["ours f32"], seconds["ours bf16"]), 2),
                    "real_greedy_ids_match_fraction_bf16": match["bf16"]})
        if torch_bf16:
            out["real_decode_bf16_speedup_vs_torch_bf16"] = round(seconds["transformers bf16"] / seconds["ours bf16"], 2)
    return out


def bench_prefill(args) -> dict:
    from bench._common import interleaved_times
    from bench._smollm2 import random_smollm2
    from cgc_lora_jax.precision import resolve_dtype

    _, cfg, params = random_smollm2()
    dtype = jnp.dtype(resolve_dtype(args.prefill_dtype))
    model = LlamaForCausalLM(cfg).clone(dtype=dtype, param_dtype=dtype)
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    b, t = args.prefill_batch, args.prefill_prompt
    ids = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (b, t)), jnp.int32)
    mask = jnp.ones((b, t), jnp.int32).at[: b // 2, : t // 4].set(0)  # half the rows left-padded by a quarter

    def prefill(empty_known: bool):
        @jax.jit
        def call(params, ids, mask):
            cache = model.init_cache(b, t + args.real_new)
            cache = {**cache, "index": 0} if empty_known else cache
            logits, _ = model.apply({"params": params}, ids, mask, cache=cache, method=model.decode, last_only=True)
            return logits[:, -1]
        return lambda: call(params, ids, mask)

    variants = {"cache read": prefill(False), "own keys": prefill(True)}
    logits = {name: np.asarray(fn(), np.float32) for name, fn in variants.items()}
    same = float(np.mean(logits["cache read"].argmax(-1) == logits["own keys"].argmax(-1)))
    gap = float(np.max(np.abs(logits["cache read"] - logits["own keys"])))
    times = interleaved_times(variants, rounds=args.runs, warmup=0, wait=jax.block_until_ready)
    seconds = {name: statistics.median(v) for name, v in times.items()}
    print(f"\nprefill, SmolLM2-135M shapes (random), {b} x {t} tokens (half the rows a quarter padding), "
          f"{dtype.name}, cache of {t + args.real_new} slots, median of {args.runs} interleaved rounds; "
          f"next tokens equal {same:.3f}, largest logit gap {gap:.3g}")
    print(f"{'variant':<28}{'seconds':>10}{'tokens/s':>12}")
    for name, sec in seconds.items():
        print(f"{name:<28}{sec:>10.3f}{b * t / sec:>12.1f}")
    return {"prefill_seconds": {k: round(v, 3) for k, v in seconds.items()},
            "prefill_speedup": round(seconds["cache read"] / seconds["own keys"], 2),
            "prefill_next_tokens_equal": same, "prefill_dtype": dtype.name}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="tiny,real", help="comma-separated: tiny, real (SmolLM2-135M shapes), prefill")
    parser.add_argument("--batch", type=int, default=4, help="rows per generate call (tiny)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt length in tokens (tiny)")
    parser.add_argument("--new", type=int, default=64, help="new tokens per row (tiny)")
    parser.add_argument("--real-batch", type=int, default=32, help="rows per generate call (real)")
    parser.add_argument("--real-prompt", type=int, default=64, help="prompt length in tokens (real)")
    parser.add_argument("--real-new", type=int, default=64, help="new tokens per row (real)")
    parser.add_argument("--real-bf16", action="store_true", help="also our bfloat16 row (real)")
    parser.add_argument("--prefill-batch", type=int, default=64, help="rows (prefill; med8 answers 64 a batch)")
    parser.add_argument("--prefill-prompt", type=int, default=256, help="prompt tokens (prefill; med8: 256)")
    parser.add_argument("--prefill-dtype", default="auto", help="float32 | bfloat16 | auto (prefill)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per side (median taken)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--torch-bf16", choices=("auto", "yes", "no"), default="auto",
                        help="the transformers bf16 variant (real); auto: only where the CPU has native bf16")
    parser.add_argument("--plain-malloc", action="store_true",
                        help="keep glibc's default malloc settings (no reuse_freed_memory, which eval.py calls)")
    args = parser.parse_args(argv)
    reused = False if args.plain_malloc else reuse_freed_memory()  # as the entry points, before jax starts
    parts = set(args.parts.split(","))
    if parts - {"tiny", "real", "prefill"}:
        parser.error(f"--parts {args.parts}: unknown {sorted(parts - {'tiny', 'real', 'prefill'})}")
    result = {"torch_threads": args.threads, "cpu_count": os.cpu_count(), "host_memory_reuse": reused}
    if "tiny" in parts:
        result.update(bench_tiny(args))
    if "real" in parts:
        result.update(bench_real(args))
    if "prefill" in parts:
        result.update(bench_prefill(args))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
