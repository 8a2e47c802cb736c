"""The paper's Tables III and V on a config's data: every row trained (or prompted), answered on dev
and test, scored on dev by the official rules, and printed as mean +- std over seeds.

    python bench/paper_table.py --config med8 --out runs/table [--quick] [--seeds 3] [--rows cgc_lora,lora_full]

Rows, all at the config's total rank r = N_c r_c + M r_s (med8: 4 * 2 + 8 * 1 = 16), as the paper
compares at equal trainable size. The trained rows are the named configs lora_full, lora_single,
moelora, no_gate and per_layer_gates, made from this config instead of promptcblue by the same
definition (cgc_lora_jax/baselines.py: `with_baseline`):

    icl              In-context: the base alone, --icl-shots solved training examples of the task in
                     the prompt (our stand-in for the paper's ChatGPT row); prompts get twice the
                     config's prompt budget so that the examples fit
    lora_full        one rank-r LoRA on all tasks
    lora_single      one LoRA per task, rank r / M each, nothing shared
    lorahub          lora_single's per-task LoRAs composed per task (--hub-shots, NGOpt --hub-budget)
    moelora          r / r_c common experts of rank r_c mixed by the task gate, no specific experts
    cgc_lora         the config itself: common experts, one specific expert per task, shared gate
    no_gate          CGC-LoRA with uniform expert weights (paper 5.6)
    per_layer_gates  CGC-LoRA with one gate per adapted layer ("multiple gates", 5.7)

Each row and seed k lives in OUT/<row>/seed<k>/: the training run (config, checkpoints, adapters),
predictions_dev.jsonl and scores_dev.json (the official rules on dev, capped at the config's
data.max_eval_per_task per task), predictions_test.jsonl (every test sample id, the submission
format; test has no targets) and done.json. A folder with done.json is skipped, and an
interrupted training run resumes from its checkpoint, so the same command finishes a partial
table. Seeds: seed k trains with train.seed = config seed + k (adapter init, data order,
dropout); the in-context row draws its examples with seed k.

--quick: rows icl, lora_full, cgc_lora, one seed. --seeds K: K seeds for cgc_lora and lora_full
(the rows whose difference the paper claims), min(K, --other-seeds) for the rest. Runs go seed by
seed (every row's seed 0, then seed 1, ...), so a table cut short is still whole for the seeds it
has; --minutes M starts no new row/seed after M minutes and summarises what finished.
--dev-only trains and scores dev and skips the test predictions (the slow part of a row on a CPU:
721 med8 prompts); the same command without it later predicts test for those folders without
training again (done.json lists the splits a folder has answered).
--only-seeds K,K runs those seeds alone, so that processes or machines can share a table (on one
GPU, run them one after another: processes sharing a GPU without CUDA's multi-process service
time-slice it, and six at once ran at about 1/40 of one's speed each). --override KEY=VALUE
changes every row, --row-override ROW:KEY=VALUE one row (a learning rate chosen per row on dev).
A finished folder is skipped whatever the overrides (each run's config.json records its own), so
give a table of other settings its own --out.

Prints the table of every finished row/seed folder in OUT, whichever command ran it (percent,
mean +- std over seeds per task and average; std is the sample std, 0 for one seed) and CGC-LoRA
minus each row on the dev average, paired by seed, with the 95% t-interval of the mean difference
and whether it is beyond the seed spread; writes
OUT/table_dev.md (both), OUT/table_dev.png and OUT/table.json, and ends with one JSON line of the
averages, the paired mean differences and each row's seconds. Choose hyperparameters on dev only: this script
never scores test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cgc_lora_jax.baselines import TITLES, with_baseline  # noqa: E402
from cgc_lora_jax.config import load_config  # noqa: E402
from cgc_lora_jax.evaluation.report import plot_comparison, read_scores  # noqa: E402
from cgc_lora_jax.cli.train import prepare_process  # noqa: E402

ROWS = ("icl", "lora_full", "lora_single", "lorahub", "moelora", "cgc_lora", "no_gate", "per_layer_gates")
ROW_NAMES = {"icl": "In-context", "lorahub": "LoRAHub", **TITLES}
QUICK_ROWS = ("icl", "lora_full", "cgc_lora")
MULTI_SEED_ROWS = ("cgc_lora", "lora_full")
DONE = "done.json"
SPLITS = ("dev", "test")


def row_config(row: str, config: str, overrides: list[str]):
    """The config of a trained row: `config` with `overrides`, its lora layout made `row` at the
    config's total rank (cgc_lora_jax/baselines.py; LoRAHub composes LoRA Single's adapters)."""
    return with_baseline(load_config(config, overrides), "lora_single" if row == "lorahub" else row)


def answer_splits(workdir: Path, splits: tuple[str, ...] = SPLITS) -> None:
    """Merged-per-task answers of a trained run: dev scored, test (every record) predicted."""
    from cgc_lora_jax.evaluation.evaluate import benchmark_of, load_run, merged_answers, split_file, write_results

    run = load_run(workdir, "dev")
    if "dev" in splits:
        write_results(workdir, "dev", run.records, merged_answers(run), benchmark_of(run.cfg.data),
                      workdir.parent.name, split_file(run.cfg.data, workdir, "dev"))
    if "test" in splits:
        test = test_view(run)
        write_results(workdir, "test", test.records, merged_answers(test), benchmark_of(run.cfg.data),
                      workdir.parent.name, split_file(run.cfg.data, workdir, "test"))


def uncapped(cfg):
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.data.max_eval_per_task = 0
    return cfg


def test_view(run):
    """The loaded run with its split swapped for the whole test file (the submission needs every id)."""
    from cgc_lora_jax.run import encode, read_data

    splits, _ = read_data(uncapped(run.cfg).data, run.workdir, seed=run.cfg.train.seed, splits=("test",),
                          prediction_splits=("test",))
    records = list(splits.datasets["test"])
    return dataclasses.replace(run, split="test", records=records,
                               prompts=encode(run.cfg.data, records, run.base, run.vocab, for_prediction=True))


def run_row(row: str, seed: int, folder: Path, args, splits: tuple[str, ...] = SPLITS) -> None:
    """Train (or prompt) one row/seed and answer `splits`; without "dev", the row was trained and
    scored on dev before (--dev-only) and only its test predictions are made now."""
    from cgc_lora_jax.evaluation.icl import run_icl
    from cgc_lora_jax.evaluation.lorahub import run_lorahub
    from cgc_lora_jax.training.loop import train

    overrides = overrides_of(row, args)
    common = [*overrides, f"train.seed={load_config(args.config, overrides).train.seed + seed}"]
    if row == "icl":
        cfg = load_config(args.config, common)
        with cfg.unlocked():
            cfg.data.max_source_len *= 2
        for split in splits:
            run_icl(cfg if split == "dev" else uncapped(cfg), folder, shots=args.icl_shots, seed=seed, split=split)
        return
    if row == "lorahub":
        source = folder.parents[1] / "lora_single" / f"seed{seed}"
        if not (source / DONE).is_file():
            raise SystemExit(f"the lorahub row needs {source} (the lora_single row of seed {seed}) first")
        for split in splits:
            run_lorahub(source, folder, shots=args.hub_shots, budget=args.hub_budget, split=split, seed=seed,
                        every_record=split == "test")
        return
    if "dev" in splits and train(row_config(row, args.config, common), folder).get("preempted"):
        from cgc_lora_jax.training.preemption import EXIT_STATUS

        print(f"{row}/seed{seed}: stopped by SIGTERM, its checkpoint saved in {folder}/checkpoints; the same "
              "command resumes it", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_STATUS)
    answer_splits(folder, splits)


def finished_splits(folder: Path) -> tuple[str, ...]:
    """The splits a row/seed folder has answered: its done.json's "splits" (both for a done.json
    written before --dev-only existed), none without one."""
    if not (folder / DONE).is_file():
        return ()
    return tuple(json.loads((folder / DONE).read_text() or "{}").get("splits", SPLITS))


def overrides_of(row: str, args) -> list[str]:
    """--override for every row, then this row's --row-override (LoRAHub composes LoRA Single's
    adapters, so it takes LoRA Single's)."""
    source = "lora_single" if row == "lorahub" else row
    return [*args.override, *(kv for name, kv in args.row_override if name in (row, source))]


def row_override(text: str) -> tuple[str, str]:
    row, sep, kv = text.partition(":")
    if not sep or "=" not in kv or row not in ROWS:
        raise argparse.ArgumentTypeError(f"{text!r}: give ROW:KEY=VALUE with ROW one of {','.join(ROWS)}, "
                                         "e.g. cgc_lora:train.lr=3e-3")
    return row, kv


def seeds_of(row: str, args) -> range:
    return range(args.seeds if row in MULTI_SEED_ROWS else min(args.seeds, args.other_seeds))


def run_order(rows: list[str], args) -> list[tuple[str, int]]:
    """(row, seed) pairs seed by seed, rows in table order within a seed (LoRAHub after LoRA Single);
    with --only-seeds, those seeds alone (the table still summarises every finished seed)."""
    most = max(len(seeds_of(row, args)) for row in rows)
    chosen = range(most) if args.only_seeds is None else args.only_seeds
    return [(row, seed) for seed in range(most) for row in rows if seed in seeds_of(row, args) and seed in chosen]


def finished_seeds(out: Path, row: str) -> list[int]:
    """The seeds of `row` whose folder in `out` has answered dev (done.json), in order."""
    folders = (out / row).glob("seed*") if (out / row).is_dir() else ()
    return sorted(int(f.name[4:]) for f in folders if f.name[4:].isdigit() and "dev" in finished_splits(f))


def summarise(out: Path) -> tuple[dict, dict]:
    """{row name: {task: [dev score per seed]}} of every finished row/seed folder in `out` (whatever
    --rows, --seeds or --quick this run was given, so a table filled by several commands is shown
    whole), and {row name: [their seeds]}."""
    table, seeds = {}, {}
    for row in ROWS:
        finished = finished_seeds(out, row)
        if not finished:
            continue
        per_seed = [read_scores(out / row / f"seed{s}", "dev") for s in finished]
        table[ROW_NAMES[row]] = {task: [s[task] for s in per_seed] for task in per_seed[0]}
        seeds[ROW_NAMES[row]] = finished
    return table, seeds


def mean_std_table(table: dict) -> str:
    tasks = [t for t in next(iter(table.values())) if t != "average"] + ["average"]
    lines = ["| row | seeds | " + " | ".join(tasks[:-1]) + " | Avg. |", "|---" * (len(tasks) + 2) + "|"]
    for name, scores in table.items():
        cells = []
        for task in tasks:
            values = [100 * v for v in scores[task]]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.2f} ± {std:.2f}")
        lines.append(f"| {name} | {len(scores['average'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_differences(table: dict, seeds: dict, reference: str = ROW_NAMES["cgc_lora"]) -> tuple[str, dict]:
    """`reference` minus every other row on the dev average, paired by seed (the same seed draws the
    same dev records and batches for every row), in percent points: per seed, mean +- sample std,
    and the two-sided 95% Student-t interval of the mean difference; the reading says whether the
    difference is beyond the seed spread (the interval excludes 0). Returns the markdown block and
    {row: mean difference}; empty without the reference row."""
    from scipy import stats

    if reference not in table:
        return "", {}
    mine = dict(zip(seeds[reference], table[reference]["average"]))
    lines = [f"{reference} minus each row, dev average, paired by seed (percent points):", "",
             "| row | paired seed numbers | per seed | mean ± sd | 95% interval | reading |", "|---" * 6 + "|"]
    means = {}
    for name, scores in table.items():
        shared = [k for k in seeds[name] if k in mine and name != reference]
        if not shared:
            continue
        theirs = dict(zip(seeds[name], scores["average"]))
        diffs = [100 * (mine[k] - theirs[k]) for k in shared]
        mean = means[name] = statistics.mean(diffs)
        if len(diffs) > 1:
            sd = statistics.stdev(diffs)
            half = stats.t.ppf(0.975, len(diffs) - 1) * sd / len(diffs) ** 0.5
            spread, interval = f"{mean:+.2f} ± {sd:.2f}", f"{mean - half:+.2f} .. {mean + half:+.2f}"
            if mean - half > 0 or mean + half < 0:
                reading = f"{reference} {'ahead' if mean > 0 else 'behind'} beyond the seed spread"
            else:
                reading = "within the seed spread"
        else:
            spread, interval, reading = f"{mean:+.2f}", "–", "one paired seed: no spread to judge by"
        lines.append(f"| {name} | {','.join(map(str, shared))} | {', '.join(f'{d:+.2f}' for d in diffs)} | "
                     f"{spread} | {interval} | {reading} |")
    return ("\n".join(lines) + "\n" if means else ""), means


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of seed numbers") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give seed numbers 0, 1, ...")
    return seeds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="med8", help="the CGC-LoRA config every row starts from")
    parser.add_argument("--out", required=True, help="table folder (finished row/seed folders are skipped)")
    parser.add_argument("--quick", action="store_true", help=f"rows {','.join(QUICK_ROWS)}, one seed")
    parser.add_argument("--seeds", type=int, default=3, help=f"seeds of {' and '.join(MULTI_SEED_ROWS)}")
    parser.add_argument("--other-seeds", type=int, default=1, help="at most this many seeds for the other rows")
    parser.add_argument("--only-seeds", type=seed_list, default=None, metavar="K,K",
                        help="run these seeds alone (e.g. 2, or 0,1), as when several processes or machines "
                             "share one table; the table shows every finished seed in --out")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--icl-shots", type=int, default=2, help="in-context examples per prompt")
    parser.add_argument("--hub-shots", type=int, default=5, help="LoRAHub few-shot examples per task")
    parser.add_argument("--hub-budget", type=int, default=40, help="LoRAHub gradient-free evaluations per task")
    parser.add_argument("--dev-only", action="store_true",
                        help="train and score on dev, skip the test predictions (the same command without "
                             "--dev-only later predicts test for those folders without training again)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="start no new row/seed after this many minutes; the table shows what finished")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every row, e.g. --override train.steps=100 (repeatable)")
    parser.add_argument("--row-override", action="append", default=[], type=row_override, metavar="ROW:KEY=VALUE",
                        help="a config override for one row, after --override, e.g. --row-override "
                             "cgc_lora:train.lr=3e-3 (repeatable): a learning rate chosen per row on dev")
    args = parser.parse_args(argv)
    rows = list(QUICK_ROWS) if args.quick else [r.strip() for r in args.rows.split(",") if r.strip()]
    if args.quick:
        args.seeds = 1
    if args.only_seeds is not None and max(args.only_seeds) >= args.seeds:
        parser.error(f"--only-seeds {','.join(map(str, args.only_seeds))}: the table has seeds 0-{args.seeds - 1} "
                     f"(--seeds {args.seeds})")
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {','.join(ROWS)}")
    if "lorahub" in rows and "lora_single" not in rows:
        rows.append("lora_single")
    rows.sort(key=lambda r: (r == "lorahub", ROWS.index(r)))  # LoRAHub after LoRA Single
    try:
        for row in set(rows) - {"icl"}:
            row_config(row, args.config, overrides_of(row, args))  # a row that cannot be made fails now
    except ValueError as e:
        parser.error(f"config {args.config!r}: {e}")
    prepare_process(load_config(args.config, args.override))  # as train.py, before jax starts its backend
    out = Path(args.out)
    seconds, began = {}, time.perf_counter()
    wanted = ("dev",) if args.dev_only else SPLITS
    for row, seed in run_order(rows, args):
        folder = out / row / f"seed{seed}"
        done = finished_splits(folder)
        todo = tuple(split for split in wanted if split not in done)
        if not todo:
            print(f"{row}/seed{seed}: done, skipped", flush=True)
            continue
        if args.minutes is not None and time.perf_counter() - began >= 60 * args.minutes:
            print(f"{row}/seed{seed}: not started, --minutes {args.minutes:g} spent", flush=True)
            continue
        start = time.perf_counter()
        run_row(row, seed, folder, args, todo)
        took = round(time.perf_counter() - start, 1)
        before = json.loads((folder / DONE).read_text() or "{}").get("seconds", 0) if done else 0
        (folder / DONE).write_text(json.dumps({"row": row, "seed": seed, "seconds": round(before + took, 1),
                                               "splits": [s for s in SPLITS if s in done or s in todo]}) + "\n")
        seconds[f"{row}/seed{seed}"] = took
        print(f"{ROW_NAMES[row]} seed {seed} ({', '.join(todo)}): {took} s", flush=True)

    table, finished = summarise(out)
    if not table:
        raise SystemExit(f"no row/seed has finished in {out}: nothing to tabulate")
    paired, differences = paired_differences(table, finished)
    text = mean_std_table(table) + ("\n" + paired if paired else "")
    print()
    print(text)
    (out / "table_dev.md").write_text(text, encoding="utf-8")
    means = {name: {t: statistics.mean(v) for t, v in scores.items()} for name, scores in table.items()}
    chart = plot_comparison(means, out / "table_dev.png", f"{args.config}, dev, mean over seeds")
    (out / "table.json").write_text(json.dumps(table, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"chart: {chart}")
    print(json.dumps({"config": args.config, "averages": {n: round(100 * m["average"], 2) for n, m in means.items()},
                      "cgc_lora_minus": {n: round(d, 2) for n, d in differences.items()},
                      "seconds": seconds, "total_seconds": round(sum(seconds.values()), 1)}))


if __name__ == "__main__":
    main()
