"""Generate answers for a trained run and score them.

Two ways to serve the adapters, the same answers either way (up to float rounding):
  merged (default)  per task, the task's experts folded into the base weights (paper eq. 8 and
                    section 4.3) and that task's prompts generated in batches at the base
                    model's cost;
  fused             one pass over mixed-task batches with the adapters applied on the fly.

Predictions are written in the PromptCBLUE submission format (each input record with `target`
replaced by the model's output) to OUT/predictions_<split>.jsonl, the scores to
OUT/scores_<split>.json ({task: score, "average": mean}) with a Markdown table
(scores_<split>.md) and a bar chart (scores_<split>.png) beside it; OUT is the run's workdir
unless `out_dir` is given. The baselines that are not trained runs (cgc_lora_jax.evaluation.lorahub,
cgc_lora_jax.evaluation.icl) write the same files through `write_results`.

    scores = evaluate_run("runs/demo", split="test")
    scores = evaluate_run("runs/demo", split="test", fused=True, out_dir="runs/demo/fused")
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from tqdm.auto import tqdm

from cgc_lora_jax.data.records import FORMATS, PROMPTCBLUE_FIELDS
from cgc_lora_jax.evaluation.answers import GenerationSettings, generate_answers
from cgc_lora_jax.evaluation.report import write_scores
from cgc_lora_jax.layers import CGCLoRAConfig
from cgc_lora_jax.merge import merge_task
from cgc_lora_jax.run import ADAPTERS_DIR, BaseModel, answering_model_config, attach_adapters, data_folder, encode, load_base, load_run_config, read_data
from cgc_lora_jax.scoring import BENCHMARKS, score_records


@dataclasses.dataclass
class LoadedRun:
    """A trained run, ready to generate: its config, data split, base model and adapters."""

    workdir: Path
    cfg: ml_collections.ConfigDict
    vocab: Any  # TaskVocab of the run
    split: str
    records: list[dict]  # the split's records in file order (PromptCBLUE fields)
    prompts: Any  # EncodedSplit of their generation prompts
    base: BaseModel  # base.model carries the adapters
    lora: CGCLoRAConfig
    params: dict  # the frozen base joined with the trained adapters
    train: Any = None  # the training split's records (a datasets.Dataset) when asked for


def load_run(workdir: str | Path, split: str | None = None, with_train: bool = False,
             every_record: bool = False) -> LoadedRun:
    """Everything needed to generate for `split` (default: the run's eval.split).

    every_record: read all of the split, whatever data.max_eval_per_task (a submission file
    needs every sample id)."""
    workdir = Path(workdir)
    cfg = load_run_config(workdir)
    if every_record:
        cfg.data.max_eval_per_task = 0
    split = split or cfg.eval.split
    adapters_dir = workdir / ADAPTERS_DIR
    if not (adapters_dir / "meta.json").is_file():
        raise FileNotFoundError(
            f"{adapters_dir} holds no trained adapters (meta.json): training writes them when it "
            f"ends; finish or resume the run (python train.py --config NAME --workdir {workdir})")
    wanted = ("train", split) if with_train and split != "train" else (split,)
    splits, vocab = read_data(cfg.data, workdir, seed=cfg.train.seed, splits=wanted, prediction_splits=(split,))
    records = list(splits.datasets[split])
    # The plain base, then the run's adapters on it (no throw-away adapter init); a base whose
    # fingerprint differs from training's is a BaseMismatchError naming both.
    run = attach_adapters(load_base(answering_model_config(cfg), lora=None, workdir=workdir), workdir)
    prompts = encode(cfg.data, records, run.base, vocab, for_prediction=True)
    return LoadedRun(workdir, cfg, vocab, split, records, prompts, run.base, run.lora, run.params,
                     splits.datasets["train"] if with_train else None)


def benchmark_of(data_cfg) -> str:
    """The scorer of a data format: each format's name is its benchmark's (scoring.BENCHMARKS)."""
    return data_cfg.format


def split_file(data_cfg, workdir: str | Path, split: str) -> Path | None:
    """The split's file when its records are in the submission format (PromptCBLUE-shaped)."""
    if FORMATS.get(data_cfg.format) is not PROMPTCBLUE_FIELDS:
        return None
    return data_folder(data_cfg, Path(workdir)) / f"{split}.json"


def submission_records(records: list[dict], answers: dict[int, str], source: Path | None = None) -> list[dict]:
    """Each record with `target` replaced by its answer. With `source` (the PromptCBLUE-format
    file the records were read from) a record is that file's own JSON object, fields and order
    unchanged; otherwise it is the reader's row (PromptCBLUE field names) without line_number."""
    lines = open(source, "rb").readlines() if source is not None else None
    predictions = []
    for i, record in enumerate(records):
        if lines is not None:
            raw = json.loads(lines[record["line_number"] - 1])
        else:
            raw = {k: v for k, v in record.items() if k != "line_number"}
        predictions.append({**raw, "target": answers[i]})
    return predictions


def write_results(out_dir: str | Path, split: str, records: list[dict], answers: dict[int, str],
                  benchmark: str, title: str, source: Path | None = None) -> dict[str, float]:
    """Write the predictions (see `submission_records`), then (when the records have gold
    targets) score them and write the scores, table and chart; returns the scores ({} when
    nothing could be scored)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions = submission_records(records, answers, source)
    pred_path = out_dir / f"predictions_{split}.jsonl"
    pred_path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions), encoding="utf-8")
    if not all(r["target"] for r in records):
        print(f"{split} has no gold targets: predictions written to {pred_path}, nothing scored")
        return {}
    if benchmark not in BENCHMARKS:
        print(f"no scorer for data format {benchmark!r} (scorers: {', '.join(BENCHMARKS)}): "
              f"predictions written to {pred_path}, nothing scored")
        return {}
    scores = score_records(predictions, records, benchmark=benchmark)
    print(write_scores(out_dir, split, scores, title))
    for record in predictions[:3]:
        print(f"[{record['task_dataset']}] {record['input'][-40:]!r} -> {record['target']!r}")
    return scores


def merged_answers(run: LoadedRun, bar=None) -> dict[int, str]:
    """{row: answer} for every prompt of the run's split, per task with its experts merged."""
    answers, settings = {}, GenerationSettings.from_config(run.cfg)
    plain = run.base.model.clone(lora=None)
    for task_id, task in enumerate(run.vocab.tasks):
        rows = np.flatnonzero(run.prompts.task_ids == task_id)
        if len(rows) == 0:
            continue
        if bar is not None:
            bar.set_postfix(task=task)
        merged = merge_task(run.params, task_id, run.lora)
        answers.update(generate_answers(plain, merged, run.prompts, rows, settings, run.base.tokenizer, bar=bar))
    return answers


def evaluate_run(workdir: str | Path, split: str | None = None, fused: bool = False,
                 out_dir: str | Path | None = None) -> dict[str, float]:
    """Generate and score `split` (default: the run's eval.split) of a trained run; see above."""
    run = load_run(workdir, split)
    records, prompts, tokenizer = run.records, run.prompts, run.base.tokenizer
    settings = GenerationSettings.from_config(run.cfg)
    bar = tqdm(total=len(records), desc=f"eval {run.split}" + (" fused" if fused else ""), unit="sample")
    if fused:
        answers = generate_answers(run.base.model, run.params, prompts, np.arange(len(records)), settings,
                                   tokenizer, with_task_ids=True, bar=bar)
    else:
        answers = merged_answers(run, bar)
    bar.close()
    out_dir = Path(out_dir) if out_dir is not None else run.workdir
    return write_results(out_dir, run.split, records, answers, benchmark_of(run.cfg.data), out_dir.name,
                         split_file(run.cfg.data, run.workdir, run.split))
