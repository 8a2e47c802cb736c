"""Greedy decoding throughput: our jit generate (models/generate.py) vs transformers' generate.

Same tiny random Llama in both (float32, CPU): batch 4, 32-token prompts, 64 new tokens, no eos.
Both are warmed up first (ours compiles once); each then runs `--runs` times and the median wall
time counts. tokens/s = batch * new tokens / seconds, prefill included. torch runs with `--threads`
intra-op threads and, as a second row, with one: on a small shared machine torch's thread pool can
be far slower than one thread, and the single-thread row shows how much of the ratio that is.
Prints a side-by-side table, then, last, one JSON line with decode_speedup_vs_torch = our tokens/s
over transformers' tokens/s at `--threads` (and ..._1_thread).

    python bench/decode.py [--runs 3] [--threads 2]
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="rows per generate call")
    parser.add_argument("--prompt", type=int, default=32, help="prompt length in tokens")
    parser.add_argument("--new", type=int, default=64, help="new tokens per row")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per side (median taken)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    hf, model, params = tiny_models()
    ids = np.random.default_rng(0).integers(3, SIZES["vocab_size"], (args.batch, args.prompt))
    mask = np.ones_like(ids)

    def ours():
        return np.asarray(generate(model, params, ids, mask, max_new_tokens=args.new,
                                   eos_token_id=None, pad_token_id=0))

    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)

    def theirs():
        with torch.no_grad():
            out = hf.generate(input_ids=ids_t, attention_mask=mask_t, do_sample=False, pad_token_id=0,
                              max_new_tokens=args.new, min_new_tokens=args.new)
        return out[:, args.prompt :].numpy()

    ours_ids, theirs_ids = ours(), theirs()  # warm-up (ours compiles here)
    ours_s, theirs_s = median_seconds(ours, args.runs), median_seconds(theirs, args.runs)
    torch.set_num_threads(1)
    theirs()
    one_thread_s = median_seconds(theirs, args.runs)
    tokens = args.batch * args.new
    rows = [
        ("jax jit generate (ours)", ours_s, tokens / ours_s),
        (f"transformers, {args.threads} threads", theirs_s, tokens / theirs_s),
        ("transformers, 1 thread", one_thread_s, tokens / one_thread_s),
    ]
    print(f"Llama hidden {SIZES['hidden_size']}, {SIZES['num_hidden_layers']} layers, batch {args.batch}, "
          f"prompt {args.prompt}, {args.new} new tokens, float32, {jax.devices()[0].platform}, "
          f"torch threads {args.threads}, median of {args.runs}")
    print(f"{'implementation':<28}{'seconds':>10}{'tokens/s':>12}{'ours x':>9}")
    for name, seconds, rate in rows:
        print(f"{name:<28}{seconds:>10.4f}{rate:>12.1f}{seconds / ours_s:>9.2f}")
    result = {
        "decode_tokens_per_s_ours": round(tokens / ours_s, 1),
        "decode_tokens_per_s_torch": round(tokens / theirs_s, 1),
        "decode_speedup_vs_torch": round(theirs_s / ours_s, 2),
        "decode_speedup_vs_torch_1_thread": round(one_thread_s / ours_s, 2),
        "torch_threads": args.threads,
        "greedy_ids_match_fraction": float(np.mean(ours_ids == theirs_ids)),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
