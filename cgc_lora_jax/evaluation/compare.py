"""The base as it is next to the trained adapters: one split, the same prompts, two rows of scores.

What `python train.py --config demo` prints after training (`eval.after_training` with `eval.compare_base`):
the run's split answered by the frozen base alone (no adapters; the instruct base's chat
template frames the same prompts) and by the trained run (per task, its experts merged into the
weights, paper eq. 8), scored by the dataset's scorer, side by side:

    | run                 | CityExtraction | ReviewSentiment | Antonym | Avg. |
    | base (no adapters)  | ...            |                 |         |      |
    | trained (CGC-LoRA)  | ...            |                 |         |      |

then a few example answers. Files: WORKDIR/demo_scores.json = {"base": {task: score, ...,
"average": mean}, "trained": {...}} (scores in [0, 1]); the trained answers and scores as
`eval.py` writes them (WORKDIR/predictions_<split>.jsonl, scores_<split>.{json,md,png}), the base's
in WORKDIR/base/. The base is loaded once for both rows.

    scores = compare_base_and_trained("runs/demo")
    scores["trained"]["average"] - scores["base"]["average"]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cgc_lora_jax.evaluation.answers import GenerationSettings, generate_answers
from cgc_lora_jax.evaluation.evaluate import benchmark_of, load_run, merged_answers, split_file, submission_records
from cgc_lora_jax.evaluation.report import markdown_table, write_scores
from cgc_lora_jax.params import split_params
from cgc_lora_jax.scoring import score_records

SCORES_FILE = "demo_scores.json"
ROW_TITLES = {"base": "base (no adapters)", "trained": "trained"}


def _write_predictions(out_dir: Path, split: str, predictions: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"predictions_{split}.jsonl").write_text(
        "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions), encoding="utf-8")


def example_lines(records: list[dict], answers: dict[str, dict[int, str]], per_task: int = 2) -> list[str]:
    """`per_task` prompts of each task with the gold answer and each row's answer."""
    lines, shown = [], {}
    for i, record in enumerate(records):
        task = record["task_dataset"]
        if shown.get(task, 0) >= per_task:
            continue
        shown[task] = shown.get(task, 0) + 1
        lines.append(f"[{task}] {record['input']!r}  gold {record['target']!r}")
        lines.extend(f"    {ROW_TITLES[row]:>19}: {row_answers[i]!r}" for row, row_answers in answers.items())
    return lines


def compare_base_and_trained(workdir: str | Path, split: str | None = None) -> dict[str, dict[str, float]]:
    """Answer, score and write the split with the base alone and with the trained run; print
    the two-row table and examples; returns {"base": scores, "trained": scores}."""
    run = load_run(workdir, split)
    base_params, _ = split_params(run.params)
    plain = run.base.model.clone(lora=None)
    answers = {
        "base": generate_answers(plain, base_params, run.prompts, np.arange(len(run.records)),
                                 GenerationSettings.from_config(run.cfg), run.base.tokenizer),
        "trained": merged_answers(run),
    }
    benchmark, source = benchmark_of(run.cfg.data), split_file(run.cfg.data, run.workdir, run.split)
    scores = {}
    for row, row_answers in answers.items():
        predictions = submission_records(run.records, row_answers, source)
        scores[row] = score_records(predictions, run.records, benchmark=benchmark)
        out_dir = run.workdir if row == "trained" else run.workdir / row
        _write_predictions(out_dir, run.split, predictions)
        write_scores(out_dir, run.split, scores[row], ROW_TITLES[row])
    (run.workdir / SCORES_FILE).write_text(json.dumps(scores, indent=2) + "\n", encoding="utf-8")
    print(f"\n{run.split} split, {len(run.records)} prompts, greedy:")
    print(markdown_table({ROW_TITLES[row]: s for row, s in scores.items()}))
    print("\n".join(example_lines(run.records, answers)))
    print(f"\nscores: {run.workdir / SCORES_FILE}")
    return scores
