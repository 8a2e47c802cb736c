"""`python eval.py` (= `python -m cgc_lora_jax eval`): evaluate runs and baselines, score prediction files, and compare runs side by side.

    python eval.py --workdir DIR [--split test] [--fused] [--out DIR]
        generate and score a trained run: per task with merged weights, batched by task (default),
        or one fused pass over mixed-task batches (--fused); writes predictions_<split>.jsonl,
        scores_<split>.json, .md and .png into the workdir (or --out)
    python eval.py score --pred PRED.jsonl --gold GOLD.jsonl --out SCORES.json [--benchmark promptcblue]
        score a prediction file alone; SCORES.json maps each task_dataset to its main score and
        "average" to the mean
    python eval.py compare DIR1 DIR2 ... [--split test] [--chart PATH.png]
        print the table of evaluated runs (rows = runs, columns = tasks + Avg.) and write a chart
    python eval.py lorahub --workdir LORA_SINGLE_RUN [--shots 5] [--budget 40] [--out DIR]
        the LoRAHub baseline from a LoRA Single run's per-task LoRAs (output: DIR/lorahub)
    python eval.py icl --config NAME --shots K --out DIR [--config.a.b=value ...]
        the in-context baseline: the config's base model, no adapters, K examples in the prompt
"""

import argparse
import sys

from cgc_lora_jax.host_memory import reuse_freed_memory

COMMANDS = ("score", "compare", "lorahub", "icl")


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def run_eval(argv) -> int:
    parser = _parser("eval.py", __doc__)
    parser.add_argument("--workdir", required=True, help="a training run's folder (config.json, adapters/)")
    parser.add_argument("--split", default=None, help="dev | test (default: the run's eval.split)")
    parser.add_argument("--fused", action="store_true", help="one fused mixed-task pass instead of merged per task")
    parser.add_argument("--out", default=None, help="where the outputs go (default: the workdir)")
    args = parser.parse_args(argv)
    from cgc_lora_jax.evaluation.evaluate import evaluate_run

    evaluate_run(args.workdir, split=args.split, fused=args.fused, out_dir=args.out)
    return 0


def run_score(argv) -> int:
    from cgc_lora_jax.scoring import BENCHMARKS

    parser = _parser("eval.py score", "Score a predictions file against the gold file.")
    parser.add_argument("--pred", required=True, help="predictions, JSON lines (PromptCBLUE submission format)")
    parser.add_argument("--gold", required=True, help="gold records, JSON lines")
    parser.add_argument("--out", required=True, help="SCORES.json to write")
    parser.add_argument("--benchmark", default="promptcblue", choices=sorted(BENCHMARKS))
    args = parser.parse_args(argv)
    from cgc_lora_jax.evaluation.report import markdown_table
    from cgc_lora_jax.scoring import score_files

    scores = score_files(args.pred, args.gold, out_path=args.out, benchmark=args.benchmark)
    print(markdown_table({args.pred: scores}))
    print(f"scores written to {args.out}")
    return 0


def run_compare(argv) -> int:
    parser = _parser("eval.py compare", "Evaluated runs side by side (the paper's Table III / IV).")
    parser.add_argument("runs", nargs="+", help="evaluated run folders (each with scores_<split>.json)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--chart", default=None, help="PNG to write (default: compare_<split>.png beside the runs)")
    args = parser.parse_args(argv)
    from cgc_lora_jax.evaluation.report import compare

    table, chart = compare(args.runs, args.split, args.chart)
    print(table)
    print(f"chart written to {chart}")
    return 0


def run_lorahub_command(argv) -> int:
    from cgc_lora_jax.evaluation.lorahub import DEFAULT_ALPHA

    parser = _parser("eval.py lorahub", "LoRAHub: per-task LoRAs of a LoRA Single run, composed per target task.")
    parser.add_argument("--workdir", required=True, help="a trained LoRA Single run (lora.num_common=0)")
    parser.add_argument("--shots", type=int, default=5, help="few-shot training examples of the target task")
    parser.add_argument("--budget", type=int, default=40, help="objective evaluations of the gradient-free search")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="L1 coefficient on the mean |w|")
    parser.add_argument("--split", default=None, help="dev | test (default: the run's eval.split)")
    parser.add_argument("--seed", type=int, default=None, help="default: the run's train.seed")
    parser.add_argument("--exclude-target", action="store_true",
                        help="compose only the other tasks' LoRAs (the original unseen-task setting)")
    parser.add_argument("--out", default=None, help="output folder (default: WORKDIR/lorahub)")
    args = parser.parse_args(argv)
    from cgc_lora_jax.evaluation.lorahub import run_lorahub

    run_lorahub(args.workdir, args.out, shots=args.shots, budget=args.budget, alpha=args.alpha, split=args.split,
                seed=args.seed, include_target=not args.exclude_target)
    return 0


def run_icl_command(argv) -> int:
    from cgc_lora_jax.config import available_configs, parse_args_with_config

    parser = _parser("eval.py icl", "In-context prompting of the base model (no adapters).")
    parser.add_argument("--config", required=True, help=f"config name: {', '.join(available_configs())}")
    parser.add_argument("--shots", type=int, required=True, help="solved examples of the same task per prompt")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--split", default=None, help="dev | test (default: the config's eval.split)")
    parser.add_argument("--seed", type=int, default=None, help="default: the config's train.seed")
    args, cfg = parse_args_with_config(parser, argv)
    from cgc_lora_jax.evaluation.icl import run_icl

    run_icl(cfg, args.out, args.shots, seed=args.seed, split=args.split)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    reuse_freed_memory()  # before jax starts its backend (cgc_lora_jax/host_memory.py)
    handlers = {None: run_eval, "score": run_score, "compare": run_compare, "lorahub": run_lorahub_command,
                "icl": run_icl_command}
    from cgc_lora_jax.data.records import DataError
    from cgc_lora_jax.run import BaseMismatchError, RunError
    from cgc_lora_jax.scoring import ScoringError

    try:
        return handlers[command](argv[1:] if command else argv)
    except (FileNotFoundError, DataError, ScoringError, RunError, BaseMismatchError) as err:  # the message names the path or run
        print(f"eval.py: error: {err}", file=sys.stderr)
        return 2
