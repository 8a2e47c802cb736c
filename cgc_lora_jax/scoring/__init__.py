"""Score model outputs against PromptCBLUE or Firefly gold records.

A record is a JSON object with `sample_id`, `target` and the task name in `task_dataset` (Firefly
records may name it in `kind` instead). Predictions pair with gold records by `sample_id`. A
prediction contributes only its `target`, the raw model output; the task and `answer_choices`
come from the gold record (the official scorer reads them from each file, where they are equal).

The result maps each task present in the gold records to its main score (`promptcblue` and
`firefly` modules say which), in the benchmark's task order, plus

    "average" = (1 / T) * sum_t score_t        over the T tasks present, unweighted.

The official PromptCBLUE scorer refuses a submission with missing predictions ("There are missing
predictions in the submission"), so this one does too: the predictions must hold exactly the gold
`sample_id`s, once each. A missing, extra or duplicated sample, a malformed JSON line, or a record
without a string `target` raises `ScoringError` naming the file and line. Blank lines are skipped.
Any text in `target` scores (in [0, 1]) and never raises.

Usage::

    scores = score_files("outputs/dev_predictions.json", "data/dev.json", out_path="scores.json")
    scores["CHIP-CDN"], scores["average"]
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cgc_lora_jax.scoring import firefly, promptcblue

# Each module provides TASK_NAMES and score_task(task, golds, predictions, choices); a benchmark's
# name is the data.format whose records it scores. The demo's scorer imports this package's
# metrics, so it is looked up lazily.
BENCHMARKS = {"promptcblue": promptcblue, "firefly": firefly, "demo": "cgc_lora_jax.demo.scorer",
              "demo_en": "cgc_lora_jax.demo.english"}


class ScoringError(ValueError):
    """Records that cannot be scored; the message names the file (or record list) and line."""


Entry = tuple[str, Any]  # (location such as "dev.json:12", decoded JSON value)


def read_jsonl(path: str | os.PathLike) -> list[Entry]:
    """(location, record) for every non-blank line of a JSON-lines file."""
    entries = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            location = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ScoringError(f"{location}: not valid UTF-8 ({err.reason})") from None
            if not line.strip():
                continue
            try:
                entries.append((location, json.loads(line)))
            except json.JSONDecodeError as err:
                raise ScoringError(
                    f"{location}: malformed JSON line ({err.msg} at column {err.colno})") from None
            except (RecursionError, ValueError) as err:  # too deeply nested; an int of > 4300 digits
                raise ScoringError(f"{location}: unreadable JSON line ({str(err).split(':')[0]})") from None
    return entries


def _index(entries: Iterable[Entry]) -> dict[Any, Entry]:
    """sample_id -> (location, record), checking each record's shape and id uniqueness."""
    by_id: dict[Any, Entry] = {}
    for location, record in entries:
        if not isinstance(record, Mapping):
            raise ScoringError(f"{location}: expected a JSON object, got {type(record).__name__}")
        sample_id = record.get("sample_id")
        if isinstance(sample_id, bool) or not isinstance(sample_id, (str, int)):
            raise ScoringError(f"{location}: `sample_id` must be a string or an integer, "
                               f"got {sample_id!r}")
        if not isinstance(record.get("target"), str):
            raise ScoringError(f"{location}: `target` must be a string, "
                               f"got {record.get('target')!r}")
        if sample_id in by_id:
            raise ScoringError(f"{location}: duplicate sample_id {sample_id!r} "
                               f"(first at {by_id[sample_id][0]})")
        by_id[sample_id] = (location, record)
    return by_id


def _task_name(location: str, record: Mapping, benchmark: str) -> str:
    module = BENCHMARKS[benchmark]
    if isinstance(module, str):
        module = importlib.import_module(module)
    name = record.get("task_dataset")
    if name is None and benchmark == "firefly":
        name = record.get("kind")
    try:
        return module.canonical_task(name)
    except (KeyError, TypeError):
        raise ScoringError(f"{location}: unknown {benchmark} task {name!r}; expected one of "
                           f"{', '.join(module.TASK_NAMES)}") from None


def _score(pred_entries: Iterable[Entry], gold_entries: Iterable[Entry], benchmark: str,
           pred_source: str, gold_source: str) -> dict[str, float]:
    if benchmark not in BENCHMARKS:
        raise ValueError(
            f"unknown benchmark {benchmark!r}; expected one of {', '.join(BENCHMARKS)}")
    module = BENCHMARKS[benchmark]
    if isinstance(module, str):
        module = importlib.import_module(module)
    gold = _index(gold_entries)
    tasks = {sample_id: _task_name(location, record, benchmark)
             for sample_id, (location, record) in gold.items()}
    preds = _index(pred_entries)
    missing = [(sample_id, location) for sample_id, (location, _) in gold.items()
               if sample_id not in preds]
    if missing:
        sample_id, location = missing[0]
        raise ScoringError(
            f"{pred_source}: no prediction for {len(missing)} of {len(gold)} gold samples, the "
            f"first being sample_id {sample_id!r} ({location}); the official scorer refuses "
            "incomplete predictions")
    for sample_id, (location, _) in preds.items():
        if sample_id not in gold:
            raise ScoringError(f"{location}: sample_id {sample_id!r} is not in the gold records "
                               f"({gold_source})")
    by_task: dict[str, tuple[list, list, list]] = {}
    for sample_id, (location, record) in gold.items():
        golds, predictions, choices = by_task.setdefault(tasks[sample_id], ([], [], []))
        golds.append(record["target"])
        predictions.append(preds[sample_id][1]["target"])
        choices.append(record.get("answer_choices"))
    scores = {task: module.score_task(task, *by_task[task])
              for task in module.TASK_NAMES if task in by_task}
    total = 0.0
    for value in scores.values():
        total += value
    scores["average"] = total / len(scores) if scores else 0.0
    return scores


def score_records(pred_records: Iterable[Any], gold_records: Iterable[Any],
                  benchmark: str = "promptcblue") -> dict[str, float]:
    """{task: main score, ..., "average": mean over tasks} for in-memory records."""
    return _score(((f"predictions record {i}", r) for i, r in enumerate(pred_records, start=1)),
                  ((f"gold record {i}", r) for i, r in enumerate(gold_records, start=1)),
                  benchmark, "predictions", "gold")


def score_files(pred_path: str | os.PathLike, gold_path: str | os.PathLike,
                out_path: str | os.PathLike | None = None,
                benchmark: str = "promptcblue") -> dict[str, float]:
    """Score two JSON-lines files; also write the scores as JSON to `out_path` when given."""
    scores = _score(read_jsonl(pred_path), read_jsonl(gold_path), benchmark,
                    str(pred_path), str(gold_path))
    if out_path is not None:
        out = Path(out_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(scores, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return scores


__all__ = ["BENCHMARKS", "ScoringError", "read_jsonl", "score_files", "score_records"]
