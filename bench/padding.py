"""Padding fraction of training batches on real PromptCBLUE-med8 lengths: bucketing vs packing.

Token lengths come from the SmolLM2 tokenizer (read from its GGUF file by transformers): prompt
truncated to --max-source tokens, target + end token to --max-target, plus --template tokens of
chat-template markup per sample. Then, for one epoch of the training split:

  bucketed   the trainer's batches (cgc_lora_jax/batching.py: windows of --sort-window batches
             sorted by length, rows right-padded to a multiple of --pad-multiple)
  sorted     the same with the whole epoch in one window (the tightest bucketing)
  packed     samples packed into rows of the longest sample's padded length, one task per row,
             first-fit decreasing (cgc_lora_jax/data/packing.py)

padding fraction = 1 - real tokens / token slots. Prints a table and one JSON line.

    python bench/padding.py --gguf /path/to/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from cgc_lora_jax.data.batching import plan_epoch, round_up  # noqa: E402
from cgc_lora_jax.data.packing import pack_lengths, padding_fraction  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "promptcblue-med8" / "train.json"


def sample_lengths(path: Path, gguf: Path, max_source: int, max_target: int, template: int):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    source = tok([r["input"] for r in rows], add_special_tokens=False)["input_ids"]
    target = tok([r["target"] for r in rows], add_special_tokens=False)["input_ids"]
    lengths = np.array([min(len(s), max_source) + min(len(t) + 1, max_target) + template
                        for s, t in zip(source, target)])
    tasks = sorted({r["task_dataset"] for r in rows})
    return lengths, [tasks.index(r["task_dataset"]) for r in rows]


def bucketed_fraction(lengths, batch: int, pad_multiple: int, window: int) -> float:
    plan = plan_epoch(lengths, batch, seed=0, epoch=0, sort_window_batches=window)
    slots = sum(batch * round_up(int(lengths[b].max()), pad_multiple) for b in plan)
    return padding_fraction(lengths[plan.reshape(-1)], slots)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, required=True, help="a GGUF file holding the SmolLM2 tokenizer")
    parser.add_argument("--data", type=Path, default=DATA, help="PromptCBLUE-format train.json")
    parser.add_argument("--batch", type=int, default=16, help="rows per batch")
    parser.add_argument("--pad-multiple", type=int, default=64, help="row lengths round up to this")
    parser.add_argument("--sort-window", type=int, default=8, help="batches per sorted window (bucketed)")
    parser.add_argument("--max-source", type=int, default=1024, help="prompt tokens kept")
    parser.add_argument("--max-target", type=int, default=196, help="target tokens kept (with the end token)")
    parser.add_argument("--template", type=int, default=12, help="chat-template tokens per sample")
    args = parser.parse_args()
    lengths, tasks = sample_lengths(args.data, args.gguf, args.max_source, args.max_target, args.template)
    row = round_up(int(lengths.max()), args.pad_multiple)
    rows = pack_lengths(lengths, tasks, row)
    result = {
        "padding_bucketed": bucketed_fraction(lengths, args.batch, args.pad_multiple, args.sort_window),
        "padding_sorted": bucketed_fraction(lengths, args.batch, args.pad_multiple, len(lengths)),
        "padding_packed": padding_fraction(lengths, len(rows) * row),
        "samples": len(lengths), "packed_rows": len(rows), "row_length": row,
        "length_median": float(np.median(lengths)), "length_max": int(lengths.max()),
    }
    print(f"{len(lengths)} samples of {args.data.name}: median {result['length_median']:.0f} tokens, max "
          f"{result['length_max']}; batches of {args.batch}, pad multiple {args.pad_multiple}")
    print(f"{'layout':<34} {'padding':>8}")
    for name, key in ((f"bucketed (window {args.sort_window} batches)", "padding_bucketed"),
                      ("sorted (whole epoch, tightest)", "padding_sorted"),
                      (f"packed ({len(rows)} rows of {row})", "padding_packed")):
        print(f"{name:<34} {result[key]:8.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
