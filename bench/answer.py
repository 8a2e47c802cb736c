"""Answering a split task by task (evaluation/answers.py), with the last batch of each task fitted
to its prompts or filled to the full batch size with filler rows.

Merged evaluation answers each task alone (its experts folded into the base), so a task's last
batch is often short: med8's dev split has 20 prompts a task, answered in batches of 64. Filled,
each task decodes 64 rows for 20 prompts; fitted (the default since this bench was written), it
decodes 24 (batching.fitted_rows: the smallest 2^k or 3 * 2^(k-1) >= the prompts, at least 8;
32 until 2026-12-05, powers of two). Both variants answer the same prompts with generate_answers on SmolLM2-135M shapes
(random weights, bench/_smollm2.py), every decode to the full --new tokens (no eos), in
interleaved rounds after a warm-up round that compiles each shape; the answers of the real rows
must be the same ids.

    python bench/answer.py [--groups 20,10] [--batch 64] [--prompt 120] [--new 16] [--dtype float32] [--rounds 2]
                           [--plain-malloc]

A third variant, "power of two", fits the last batch as fitted_rows did until 2026-12-05.
Prints the table, then one JSON line: answer_seconds per variant, answer_fitted_speedup (filled
over fitted), answer_ladder_over_power_of_two (fitted over the old fitting) and rows_decoded per
variant. Runs after reuse_freed_memory(), as eval.py does, unless --plain-malloc.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cgc_lora_jax.data import batching  # noqa: E402
from cgc_lora_jax.data.formatting import EncodedSplit  # noqa: E402
from cgc_lora_jax.evaluation import answers as answers_module  # noqa: E402
from cgc_lora_jax.evaluation.answers import GenerationSettings, generate_answers  # noqa: E402
from cgc_lora_jax.host_memory import reuse_freed_memory  # noqa: E402
from cgc_lora_jax.models.llama import LlamaForCausalLM  # noqa: E402


def filled_batches(*args, fit_last=False, **kwargs):
    """prompt_batches as it was: every batch completed to the full batch size."""
    return batching.prompt_batches(*args, **kwargs)


def power_of_two_rows(count: int, batch_size: int, min_rows: int = 8) -> int:
    """batching.fitted_rows as it was until 2026-12-05: the next power of two >= count."""
    return batch_size if count >= batch_size else min(batch_size, max(min_rows, 1 << max(count - 1, 0).bit_length()))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", default="20,10", help="prompts per task, comma-separated (med8 dev: 20 a task)")
    parser.add_argument("--batch", type=int, default=64, help="eval batch size (med8: 64)")
    parser.add_argument("--prompt", type=int, default=120, help="longest prompt, tokens (prompts 80%%-100%% of it)")
    parser.add_argument("--new", type=int, default=16, help="new tokens per prompt")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds (median)")
    parser.add_argument("--plain-malloc", action="store_true",
                        help="keep glibc's default malloc settings (no reuse_freed_memory, which eval.py calls)")
    args = parser.parse_args(argv)
    reused = False if args.plain_malloc else reuse_freed_memory()  # as the entry points, before jax starts

    from bench._common import interleaved_times
    from bench._smollm2 import random_smollm2

    groups = [int(g) for g in args.groups.split(",")]
    _, cfg, params = random_smollm2()
    dtype = jnp.dtype(args.dtype)
    model = LlamaForCausalLM(cfg).clone(dtype=dtype, param_dtype=dtype)
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, rng.integers(int(0.8 * args.prompt), args.prompt + 1)).astype(np.int32)
               for _ in range(sum(groups))]
    task_ids = np.repeat(np.arange(len(groups)), groups).astype(np.int32)
    split = EncodedSplit(prompts, None, task_ids, [str(i) for i in range(len(prompts))], 0, Counter())
    settings = GenerationSettings(args.batch, args.new, 16)
    rows_decoded = {"filled": 0, "power of two": 0, "fitted": 0}
    for g in groups:
        full, rest = divmod(g, args.batch)
        rows_decoded["filled"] += (full + (rest > 0)) * args.batch
        rows_decoded["power of two"] += full * args.batch + (power_of_two_rows(rest, args.batch) if rest else 0)
        rows_decoded["fitted"] += full * args.batch + (batching.fitted_rows(rest, args.batch) if rest else 0)

    def answer_all():
        out = {}
        for task in range(len(groups)):
            rows = np.flatnonzero(task_ids == task)
            out.update(generate_answers(model, params, split, rows, settings, eos_token_id=-1))
        return out

    def filled():
        with mock.patch.object(answers_module, "prompt_batches", filled_batches):
            return answer_all()

    def power_of_two():
        with mock.patch.object(batching, "fitted_rows", power_of_two_rows):
            return answer_all()

    variants = {"filled": filled, "power of two": power_of_two, "fitted": answer_all}
    same = filled() == answer_all() == power_of_two()
    times = interleaved_times(variants, rounds=args.rounds, warmup=0)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    print(f"\nSmolLM2-135M shapes (random, {args.dtype}), tasks of {args.groups} prompts of up to {args.prompt} "
          f"tokens, batches of {args.batch}, {args.new} new tokens, median of {args.rounds} interleaved rounds; "
          f"same answers: {same}")
    print(f"{'last batch':<12}{'rows decoded':>14}{'seconds':>10}")
    for name, t in seconds.items():
        print(f"{name:<12}{rows_decoded[name]:>14}{t:>10.2f}")
    result = {"answer_seconds": {k: round(v, 2) for k, v in seconds.items()},
              "answer_fitted_speedup": round(seconds["filled"] / seconds["fitted"], 2),
              "answer_ladder_over_power_of_two": round(seconds["fitted"] / seconds["power of two"], 3),
              "rows_decoded": rows_decoded, "same_answers": same, "host_memory_reuse": reused}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
