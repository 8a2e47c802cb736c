"""The paper's results table (Table III / IV shape) at demo scale, on this CPU: every row trained,
evaluated with the same evaluation, and printed side by side.

Rows (the demo config with overrides; the adapted rows keep the demo CGC-LoRA's total rank
r = N_c r_c + M r_s = 4 * 4 + 3 * 4 = 28, as the paper compares at equal trainable count):

    CGC-LoRA         the demo config: 4 common experts of rank 4, one rank-4 expert per task, shared gate
    LoRA Full        one rank-28 LoRA on all tasks (num_common=1, common_rank=28, specific_rank=0, uniform)
    LoRA Single      one rank-9 LoRA per task (num_common=0, specific_rank=9: 27), nothing shared
    MOE-LoRA         7 common experts of rank 4 mixed by the task gate, no specific experts
    w/o gate         CGC-LoRA with uniform expert weights
    multiple gates   CGC-LoRA with a gate per adapted layer
    LoRAHub          LoRA Single's per-task LoRAs composed per target task (5 shots, NGOpt budget 40)
    In-context       the base model alone, 3 solved examples of the task in the prompt

Each trained row runs `--steps` steps (default 250, peak learning rate 1e-2, 10 warmup steps) and
is evaluated merged per task on the 96 demo test prompts. The demo base is a tiny random model, so the numbers show the machinery (the
same eval for every row), not the method's quality on real tasks. Prints the table, then one JSON
line with the averages and each row's seconds.

    python bench/paper_table.py [--steps 250] [--root runs/paper_table] [--rows cgc_lora,lora_single,lorahub]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cgc_lora_jax.config import load_config  # noqa: E402
from cgc_lora_jax.evaluation.evaluate import evaluate_run  # noqa: E402
from cgc_lora_jax.evaluation.icl import run_icl  # noqa: E402
from cgc_lora_jax.evaluation.lorahub import run_lorahub  # noqa: E402
from cgc_lora_jax.evaluation.report import markdown_table, plot_comparison, read_scores  # noqa: E402
from cgc_lora_jax.training.loop import train  # noqa: E402

TRAINED_ROWS = {  # folder: (row name, lora overrides on the demo config)
    "cgc_lora": ("CGC-LoRA", []),
    "lora_full": ("LoRA Full", ["lora.num_common=1", "lora.common_rank=28", "lora.specific_rank=0", "lora.gate=uniform"]),
    "lora_single": ("LoRA Single", ["lora.num_common=0", "lora.common_rank=0", "lora.specific_rank=9", "lora.gate=uniform"]),
    "moe_lora": ("MOE-LoRA", ["lora.num_common=7", "lora.common_rank=4", "lora.specific_rank=0"]),
    "no_gate": ("w/o gate", ["lora.gate=uniform"]),
    "per_layer_gates": ("multiple gates", ["lora.gate=per_layer"]),
}
ROW_ORDER = ("icl", "lora_full", "lora_single", "lorahub", "moe_lora", "no_gate", "per_layer_gates", "cgc_lora")
ROW_NAMES = {**{k: v[0] for k, v in TRAINED_ROWS.items()}, "lorahub": "LoRAHub", "icl": "In-context"}


def train_overrides(steps: int) -> list[str]:
    return [f"train.steps={steps}", f"train.checkpoint_every={steps}", f"train.eval_every={steps}",
            "train.warmup_steps=10", "train.lr=1e-2", "mesh.data=1", "eval.max_new_tokens=16"]


def run_row(key: str, root: Path, args) -> None:
    if key in TRAINED_ROWS:
        workdir = root / key
        train(load_config("demo", train_overrides(args.steps) + TRAINED_ROWS[key][1]), workdir)
        evaluate_run(workdir)
    elif key == "lorahub":
        if not (root / "lora_single" / "adapters").is_dir():
            raise SystemExit("the LoRAHub row needs the lora_single row: add it to --rows")
        run_lorahub(root / "lora_single", root / "lorahub", shots=args.shots, budget=args.budget)
    elif key == "icl":
        cfg = load_config("demo", ["data.max_source_len=224", "eval.max_new_tokens=16", "eval.batch_size=32"])
        run_icl(cfg, root / "icl", shots=args.icl_shots)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=250, help="training steps of every trained row")
    parser.add_argument("--root", default="runs/paper_table", help="folder of the rows' runs (rows are redone)")
    parser.add_argument("--rows", default=",".join(ROW_ORDER), help=f"comma-separated subset of {','.join(ROW_ORDER)}")
    parser.add_argument("--shots", type=int, default=5, help="LoRAHub few-shot examples")
    parser.add_argument("--budget", type=int, default=40, help="LoRAHub gradient-free evaluations")
    parser.add_argument("--icl-shots", type=int, default=3, help="in-context examples per prompt")
    args = parser.parse_args()
    keys = [k.strip() for k in args.rows.split(",") if k.strip()]
    unknown = sorted(set(keys) - set(ROW_ORDER))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {','.join(ROW_ORDER)}")
    keys = sorted(keys, key=lambda k: (k == "lorahub", ROW_ORDER.index(k)))  # LoRAHub after LoRA Single
    root = Path(args.root)
    seconds = {}
    for key in keys:
        shutil.rmtree(root / key, ignore_errors=True)
        start = time.perf_counter()
        run_row(key, root, args)
        seconds[key] = round(time.perf_counter() - start, 1)
        print(f"{ROW_NAMES[key]}: {seconds[key]} s", flush=True)

    rows = {ROW_NAMES[k]: read_scores(root / k, "test") for k in ROW_ORDER if k in seconds}
    print()
    print(markdown_table(rows))
    chart = plot_comparison(rows, root / "paper_table.png", f"demo scale, {args.steps} steps")
    print(f"chart: {chart}")
    print(json.dumps({"averages": {name: round(100 * s["average"], 2) for name, s in rows.items()},
                      "seconds": {ROW_NAMES[k]: v for k, v in seconds.items()}, "steps": args.steps,
                      "total_seconds": round(sum(seconds.values()), 1)}))


if __name__ == "__main__":
    main()
