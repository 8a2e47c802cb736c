"""Read multi-task instruction data (PromptCBLUE, Firefly, generic JSON lines), validated line by line.

Every format is JSON lines, one record per line, read from local files only. A format is the
names of its fields; each record becomes a row with PromptCBLUE's field names, so predictions
written from these rows go straight to `cgc_lora_jax.scoring`:

    format       input   target   task            sample_id    answer_choices   task_type
    promptcblue  input   target   task_dataset    sample_id    answer_choices*  task_type*
    demo         as promptcblue (cgc_lora_jax.demo.dataset writes it)
    demo_en      as promptcblue (cgc_lora_jax.demo.english writes it)
    firefly      input   target   kind            (file-line)  -                -
    jsonl        the `*_field` arguments name them (input, target, task required; only
                 this format reads them)

(* optional: missing means null / ""; "file-line" ids are `<file stem>-<line>`.)

Validation, in this order; each failure has a reason name and is a `DataError` naming the file
and the 1-based line (on_error="error"; with on_error="skip" the line is dropped and counted
per reason instead):

    malformed_json       not UTF-8 JSON          missing_field    a required field is absent
    not_an_object        JSON but not {...}      bad_field_type   e.g. a number as `input`
    unknown_task         task not in `vocab`     empty_input      input is blank
    empty_target         blank target (only when require_target; prediction files may have "")
    duplicate_sample_id  sample_id seen before in the file

A task outside the configured `tasks` subset is not an error: its records are dropped silently
and counted per task in the summary. Blank lines are ignored. Then `max_per_task` keeps at most
that many records of each task, a random subset drawn with `numpy.random.default_rng([seed,
crc32(task)])` and kept in file order, so the choice depends only on the seed and the file.

Usage::

    splits = load_splits("data/promptcblue", data_format="promptcblue",
                         tasks=promptcblue.PAPER_TASKS, prediction_splits=("test",))
    splits.datasets["train"]            # datasets.Dataset with the columns in COLUMNS
    splits.vocab.save(run_dir / "task_vocab.json"); print(splits.summaries["train"].as_dict())
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import datasets
import numpy as np

from cgc_lora_jax.data.task_vocab import TaskVocab

COLUMNS = ("sample_id", "task_dataset", "task_type", "input", "target", "answer_choices",
           "line_number")
FEATURES = datasets.Features({
    "sample_id": datasets.Value("string"), "task_dataset": datasets.Value("string"),
    "task_type": datasets.Value("string"), "input": datasets.Value("string"),
    "target": datasets.Value("string"),
    "answer_choices": datasets.Sequence(datasets.Value("string")),  # a List in datasets >= 4
    "line_number": datasets.Value("int64"),
})
ON_ERROR = ("error", "skip")
SPLITS = ("train", "dev", "test")

DATA_SOURCES = (
    "Where to get the data (every split is a JSON-lines file DIR/train.json, DIR/dev.json, "
    "DIR/test.json):\n"
    "  promptcblue: the 16-task PromptCBLUE used by MOELoRA and CGC-LoRA, "
    "github.com/michael-wzhu/PromptCBLUE; put its train.json, dev.json, test.json in DIR "
    "(fields input, target, answer_choices, task_type, task_dataset, sample_id).\n"
    "  firefly: YeungNLP/firefly-train-1.1M on the Hugging Face Hub, one file "
    "firefly-train-1.1M.jsonl (fields kind, input, target); split it per task with "
    "cgc_lora_jax.data.split_per_task and write DIR/train.json, dev.json, test.json with "
    "write_records.")


@dataclasses.dataclass(frozen=True)
class FieldNames:
    """Which JSON field holds each part of a record; None = the format has no such field."""

    input: str
    target: str
    task: str
    sample_id: str | None = None  # None: ids are "<file stem>-<line>"
    answer_choices: str | None = None
    task_type: str | None = None


PROMPTCBLUE_FIELDS = FieldNames("input", "target", "task_dataset", "sample_id", "answer_choices",
                                "task_type")
FORMATS: dict[str, FieldNames | None] = {
    "promptcblue": PROMPTCBLUE_FIELDS,
    "firefly": FieldNames("input", "target", "kind"),
    "demo": PROMPTCBLUE_FIELDS,  # the built-in demo data (cgc_lora_jax.demo.dataset) is PromptCBLUE-shaped
    "demo_en": PROMPTCBLUE_FIELDS,  # the real-base demo's English tasks (cgc_lora_jax.demo.english)
    "jsonl": None,  # every field name comes from the arguments
}


class DataError(ValueError):
    """A record that cannot be used; the message starts with `file:line:`."""

    def __init__(self, location: str, reason: str, detail: str):
        super().__init__(f"{location}: {detail} [{reason}]")
        self.location, self.reason = location, reason


@dataclasses.dataclass
class ReadSummary:
    """What reading one file kept and dropped, for the training log."""

    path: str
    kept: int = 0  # records in the returned dataset
    skipped: Counter = dataclasses.field(default_factory=Counter)  # reason -> bad lines dropped
    filtered: Counter = dataclasses.field(default_factory=Counter)  # task -> outside `tasks`
    capped: Counter = dataclasses.field(default_factory=Counter)  # task -> over `max_per_task`
    per_task: Counter = dataclasses.field(default_factory=Counter)  # task -> records kept

    def as_dict(self) -> dict:
        return {"path": self.path, "kept": self.kept, "skipped": dict(self.skipped),
                "filtered": dict(self.filtered), "capped": dict(self.capped),
                "per_task": dict(self.per_task)}


def field_names(data_format: str, *, input_field: str | None = None,
                target_field: str | None = None, task_field: str | None = None,
                id_field: str | None = None, choices_field: str | None = None) -> FieldNames:
    """The format's field names. The `*_field` arguments are read by the "jsonl" format only
    (input, target and task required); the named formats fix their own fields."""
    if data_format not in FORMATS:
        raise ValueError(f"unknown data format {data_format!r}; choose one of {list(FORMATS)}")
    if FORMATS[data_format] is not None:
        return FORMATS[data_format]
    missing = [name for name, value in (("input_field", input_field),
               ("target_field", target_field), ("task_field", task_field)) if not value]
    if missing:
        raise ValueError(f"data format 'jsonl' needs {', '.join(missing)}")
    return FieldNames(input_field, target_field, task_field, id_field or None,
                      choices_field or None)


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_line(raw: bytes, location: str, fields: FieldNames, stem: str, number: int) -> dict:
    """One line as a row with COLUMNS (target may be blank); DataError when malformed."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(location, "malformed_json", f"not valid UTF-8 ({err.reason})") from None
    except json.JSONDecodeError as err:
        raise DataError(location, "malformed_json",
                        f"malformed JSON ({err.msg} at column {err.colno})") from None
    except (RecursionError, ValueError) as err:  # nesting too deep; an integer of > 4300 digits
        raise DataError(location, "malformed_json", f"unreadable JSON ({str(err).split(':')[0]})") from None
    if not isinstance(record, dict):
        raise DataError(location, "not_an_object", f"expected a JSON object, got "
                        f"{type(record).__name__}")
    required = [fields.input, fields.target, fields.task] + (
        [fields.sample_id] if fields.sample_id else [])
    for name in required:
        if name not in record:
            raise DataError(location, "missing_field", f"missing field {name!r} "
                            f"(fields present: {sorted(record)})")
    for name in (fields.input, fields.target, fields.task, fields.task_type):
        if name and name in record and not isinstance(record[name], str):
            raise DataError(location, "bad_field_type", f"field {name!r} must be a string, got "
                            f"{type(record[name]).__name__}")
    choices = record.get(fields.answer_choices) if fields.answer_choices else None
    if choices is not None and (not isinstance(choices, list)
                                or not all(isinstance(c, str) for c in choices)):
        raise DataError(location, "bad_field_type",
                        f"field {fields.answer_choices!r} must be a list of strings or null")
    for name in (fields.input, fields.target, fields.task, fields.task_type, fields.sample_id):
        if name and isinstance(record.get(name), str) and not _is_text(record[name]):
            raise DataError(location, "malformed_json", f"field {name!r} holds a lone UTF-16 surrogate "
                            "(a \\ud800-\\udfff escape without its pair), which is not text")
    if choices and not all(_is_text(c) for c in choices):
        raise DataError(location, "malformed_json", f"field {fields.answer_choices!r} holds a lone UTF-16 surrogate")
    sample_id = record[fields.sample_id] if fields.sample_id else f"{stem}-{number}"
    if isinstance(sample_id, bool) or not isinstance(sample_id, (str, int)):
        raise DataError(location, "bad_field_type", f"field {fields.sample_id!r} must be a "
                        f"string or an integer, got {sample_id!r}")
    return {"sample_id": str(sample_id), "task_dataset": record[fields.task],
            "task_type": record.get(fields.task_type, "") if fields.task_type else "",
            "input": record[fields.input], "target": record[fields.target],
            "answer_choices": choices, "line_number": number}


def cap_per_task(rows: Sequence[dict], max_per_task: int, seed: int) -> tuple[list[dict], Counter]:
    """At most `max_per_task` rows of each task (a seeded random subset, in the given order),
    and the number dropped per task."""
    by_task: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_task.setdefault(row["task_dataset"], []).append(i)
    keep: list[int] = []
    dropped: Counter = Counter()
    for task, indices in by_task.items():
        if len(indices) > max_per_task:
            rng = np.random.default_rng([seed, zlib.crc32(task.encode("utf-8"))])
            chosen = rng.choice(len(indices), size=max_per_task, replace=False)
            dropped[task] = len(indices) - max_per_task
            indices = [indices[j] for j in sorted(chosen)]
        keep.extend(indices)
    return [rows[i] for i in sorted(keep)], dropped


def read_records(path: str | os.PathLike, *, data_format: str = "promptcblue",
                 input_field: str | None = None, target_field: str | None = None,
                 task_field: str | None = None, id_field: str | None = None,
                 choices_field: str | None = None, tasks: Sequence[str] | None = None,
                 vocab: TaskVocab | None = None, require_target: bool = True,
                 max_per_task: int | None = None, seed: int = 0,
                 on_error: str = "error") -> tuple[datasets.Dataset, ReadSummary]:
    """Read and validate one JSON-lines file (see the module docstring for every rule).

    tasks: keep only these tasks (others are counted in `summary.filtered`; None or empty: keep
    every task); vocab: a record
    whose task is not in it is an `unknown_task` error; require_target=False for prediction
    files; max_per_task: None or 0 = no cap.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    fields = field_names(data_format, input_field=input_field, target_field=target_field,
                         task_field=task_field, id_field=id_field, choices_field=choices_field)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.\n{DATA_SOURCES}")
    subset = frozenset(tasks) if tasks else None
    summary = ReadSummary(str(path))
    rows: list[dict] = []
    seen_ids: dict[str, int] = {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            location = f"{path}:{number}"
            try:
                row = _parse_line(raw, location, fields, path.stem, number)
                if subset is not None and row["task_dataset"] not in subset:
                    summary.filtered[row["task_dataset"]] += 1
                    continue
                _check_row(row, location, vocab, require_target, seen_ids)
            except DataError as err:
                if on_error == "error":
                    raise
                summary.skipped[err.reason] += 1
                continue
            seen_ids[row["sample_id"]] = number
            rows.append(row)
    if max_per_task:
        rows, summary.capped = cap_per_task(rows, max_per_task, seed)
    summary.kept = len(rows)
    summary.per_task = Counter(row["task_dataset"] for row in rows)
    columns = {name: [row[name] for row in rows] for name in COLUMNS}  # from_list rejects []
    return datasets.Dataset.from_dict(columns, features=FEATURES), summary


def _check_row(row: dict, location: str, vocab: TaskVocab | None, require_target: bool,
               seen_ids: dict[str, int]) -> None:
    if vocab is not None and row["task_dataset"] not in vocab:
        raise DataError(location, "unknown_task", f"task {row['task_dataset']!r} is not in the "
                        f"task vocabulary {list(vocab.tasks)}")
    if not row["input"].strip():
        raise DataError(location, "empty_input", "empty input")
    if require_target and not row["target"].strip():
        raise DataError(location, "empty_target", "empty target (a training or scoring record "
                        "needs one; read prediction-only files with require_target=False)")
    if row["sample_id"] in seen_ids:
        raise DataError(location, "duplicate_sample_id", f"sample_id {row['sample_id']!r} "
                        f"already on line {seen_ids[row['sample_id']]}")


@dataclasses.dataclass
class Splits:
    """The datasets of one data folder, the task vocabulary they were checked against, and what
    reading each file dropped."""

    datasets: dict[str, datasets.Dataset]
    vocab: TaskVocab
    summaries: dict[str, ReadSummary]


def load_splits(data_dir: str | os.PathLike, *, data_format: str = "promptcblue",
                splits: Sequence[str] = SPLITS, prediction_splits: Sequence[str] = (),
                tasks: Sequence[str] | None = None, vocab: TaskVocab | None = None,
                max_per_task: int | Mapping[str, int] | None = None, seed: int = 0,
                on_error: str = "error", input_field: str | None = None,
                target_field: str | None = None, task_field: str | None = None,
                id_field: str | None = None, choices_field: str | None = None) -> Splits:
    """Read DATA_DIR/<split>.json for each split (the first one is normally "train").

    vocab: given (e.g. loaded from a run) it is used as is; otherwise it is `tasks` in their
    configured order, or else the sorted tasks of the first split. Every later split is checked
    against it (`unknown_task`). prediction_splits are read with require_target=False.
    max_per_task: one cap for every split or {split: cap} (a split not named is not capped).
    """
    folder = Path(data_dir)
    missing = [f"{split}.json" for split in splits if not (folder / f"{split}.json").is_file()]
    if missing:
        where = "does not exist" if not folder.is_dir() else f"lacks {', '.join(missing)}"
        raise FileNotFoundError(f"data folder {folder} {where} (format {data_format!r}).\n"
                                f"{DATA_SOURCES}")
    unknown = sorted(set(prediction_splits) - set(splits))
    if unknown:
        raise ValueError(f"prediction_splits {unknown} are not among splits {list(splits)}")
    tasks = tuple(tasks) if tasks else None  # empty: every task
    if vocab is None and tasks is not None:
        vocab = TaskVocab(tasks)
    caps = max_per_task if isinstance(max_per_task, Mapping) else {s: max_per_task for s in splits}
    read, summaries = {}, {}
    for split in splits:
        read[split], summaries[split] = read_records(
            folder / f"{split}.json", data_format=data_format, input_field=input_field,
            target_field=target_field, task_field=task_field, id_field=id_field,
            choices_field=choices_field, tasks=tasks, vocab=vocab,
            require_target=split not in prediction_splits, max_per_task=caps.get(split),
            seed=seed, on_error=on_error)
        if vocab is None:
            vocab = TaskVocab.from_data(read[split]["task_dataset"])
    return Splits(read, vocab, summaries)


def split_per_task(dataset: datasets.Dataset, sizes: Mapping[str, int],
                   seed: int = 0) -> dict[str, datasets.Dataset]:
    """Disjoint per-task samples of one dataset, e.g. the paper's Firefly splits
    (scoring.firefly.PAPER_SPLIT_SIZES: 1800 / 300 / 300 per task from firefly-train-1.1M).

    Each task's rows are permuted with `default_rng([seed, crc32(task)])`; the first sizes[first]
    go to the first split, the next ones to the second, ... A task with too few rows is an error.
    """
    by_task: dict[str, list[int]] = {}
    for i, task in enumerate(dataset["task_dataset"]):
        by_task.setdefault(task, []).append(i)
    chosen: dict[str, list[int]] = {split: [] for split in sizes}
    for task, indices in by_task.items():
        if len(indices) < sum(sizes.values()):
            raise ValueError(f"task {task!r} has {len(indices)} records; the splits {dict(sizes)} "
                             f"need {sum(sizes.values())}")
        order = np.random.default_rng([seed, zlib.crc32(task.encode("utf-8"))]).permutation(
            len(indices))
        start = 0
        for split, size in sizes.items():
            chosen[split].extend(indices[j] for j in order[start:start + size])
            start += size
    return {split: dataset.select(sorted(rows)) for split, rows in chosen.items()}


def write_records(rows, path: str | os.PathLike) -> None:
    """Write rows (dicts or a Dataset with COLUMNS) as PromptCBLUE JSON lines, which this module
    reads back with data_format="promptcblue" (`line_number` is not written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            record = {key: row[key] for key in ("input", "target", "answer_choices", "task_type",
                                                "task_dataset", "sample_id")}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
