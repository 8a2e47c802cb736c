"""Tests for cgc_lora_jax/data.py and cgc_lora_jax/task_vocab.py: readers on the real PromptCBLUE
sample records (../shared/data/promptcblue), bad-data errors naming file and line, skip counts,
per-task caps, task vocabulary round trips."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from cgc_lora_jax.data.records import (COLUMNS, DataError, load_splits, read_records, split_per_task,
                               write_records)
from cgc_lora_jax.data.task_vocab import TaskVocab
from cgc_lora_jax.scoring.firefly import PAPER_TASKS as FIREFLY_PAPER_TASKS
from cgc_lora_jax.scoring.promptcblue import PAPER_TASKS as PROMPTCBLUE_PAPER_TASKS
from conftest import PROMPTCBLUE_DATA as PROMPTCBLUE



@pytest.fixture
def promptcblue_dir() -> Path:
    if not (PROMPTCBLUE / "train.json").is_file():
        pytest.skip(f"shared PromptCBLUE records are absent ({PROMPTCBLUE})")
    return PROMPTCBLUE


def raw_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def record(task="A", sample_id="s1", target="answer", text="question", **extra) -> dict:
    return {"input": text, "target": target, "answer_choices": [], "task_type": "cls",
            "task_dataset": task, "sample_id": sample_id, **extra}


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False))
                            + "\n" for line in lines), encoding="utf-8")
    return path


def test_reads_real_records_with_every_field(promptcblue_dir):
    for split in ("train", "dev"):
        dataset, summary = read_records(promptcblue_dir / f"{split}.json")
        raw = raw_lines(promptcblue_dir / f"{split}.json")
        assert len(dataset) == summary.kept == 80
        assert Counter(dataset["task_dataset"]) == Counter({task: 5 for task in summary.per_task})
        assert len(summary.per_task) == 16 and not summary.skipped and not summary.filtered
        assert tuple(dataset.column_names) == COLUMNS
        for line_number, (row, source) in enumerate(zip(dataset, raw), start=1):
            assert {key: row[key] for key in source} == source
            assert row["line_number"] == line_number


def test_paper_subset_filters_other_tasks_and_keeps_configured_order(promptcblue_dir):
    splits = load_splits(promptcblue_dir, tasks=PROMPTCBLUE_PAPER_TASKS, prediction_splits=("test",))
    assert splits.vocab.tasks == PROMPTCBLUE_PAPER_TASKS
    assert splits.vocab.id("CMeIE") == 0 and splits.vocab.id("MedDG") == 7
    for split, dataset in splits.datasets.items():
        assert Counter(dataset["task_dataset"]) == {task: 5 for task in PROMPTCBLUE_PAPER_TASKS}
        summary = splits.summaries[split]
        assert sum(summary.filtered.values()) == 40 and len(summary.filtered) == 8
        assert not set(summary.filtered) & set(PROMPTCBLUE_PAPER_TASKS)


def test_vocab_without_subset_is_sorted_train_tasks(promptcblue_dir):
    splits = load_splits(promptcblue_dir, splits=("train", "dev"), tasks=())  # () = every task
    assert list(splits.vocab.tasks) == sorted(set(splits.datasets["train"]["task_dataset"]))
    assert len(splits.vocab) == 16


def test_test_json_needs_prediction_mode(promptcblue_dir):
    with pytest.raises(DataError, match=r"test\.json:1: empty target") as err:
        read_records(promptcblue_dir / "test.json")
    assert err.value.reason == "empty_target"
    dataset, summary = read_records(promptcblue_dir / "test.json", require_target=False)
    assert len(dataset) == 80 and set(dataset["target"]) == {""}
    _, skipped = read_records(promptcblue_dir / "test.json", on_error="skip")
    assert skipped.kept == 0 and skipped.skipped == {"empty_target": 80}
    with pytest.raises(DataError, match="test.json:1"):
        load_splits(promptcblue_dir)


def test_real_caps_are_deterministic(promptcblue_dir):
    first = load_splits(promptcblue_dir, splits=("train",), max_per_task=2, seed=3)
    again = load_splits(promptcblue_dir, splits=("train",), max_per_task=2, seed=3)
    assert list(first.datasets["train"]["sample_id"]) == list(again.datasets["train"]["sample_id"])
    assert set(Counter(first.datasets["train"]["task_dataset"]).values()) == {2}
    assert set(first.summaries["train"].capped.values()) == {3}


BAD_LINES = {
    "malformed_json": ('{"input": "q", "target": ', "malformed JSON"),
    "not_an_object": ('["input", "target"]', "expected a JSON object"),
    "missing_field": ({k: v for k, v in record(sample_id="x").items() if k != "target"},
                      "missing field 'target'"),
    "bad_field_type": (record(sample_id="x", text=12), "field 'input' must be a string"),
    "unknown_task": (record(task="Z", sample_id="x"), "task 'Z' is not in the task vocabulary"),
    "empty_input": (record(sample_id="x", text="  "), "empty input"),
    "empty_target": (record(sample_id="x", target=""), "empty target"),
    "duplicate_sample_id": (record(sample_id="s1"), "sample_id 's1' already on line 1"),
}


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_line_names_file_and_line(tmp_path, reason):
    bad, message = BAD_LINES[reason]
    # Line 2 is blank (ignored but counted): the bad record is on line 4.
    path = write_lines(tmp_path / "train.json", [record(), "", record(task="B", sample_id="s2"), bad])
    vocab = TaskVocab(["A", "B"])
    with pytest.raises(DataError) as err:
        read_records(path, vocab=vocab)
    assert str(err.value).startswith(f"{path}:4: ") and message in str(err.value)
    assert err.value.reason == reason
    dataset, summary = read_records(path, vocab=vocab, on_error="skip")
    assert list(dataset["sample_id"]) == ["s1", "s2"]
    assert summary.skipped == {reason: 1} and summary.kept == 2


def test_skip_counts_every_reason(tmp_path):
    lines = [record(), "{oops", record(sample_id="s2", target=" "), record(sample_id="s3"),
             record(sample_id="s1"), record(task="Q", sample_id="s4"), "3", record(sample_id="s5")]
    path = write_lines(tmp_path / "dev.json", lines)
    dataset, summary = read_records(path, vocab=TaskVocab(["A"]), on_error="skip")
    assert list(dataset["sample_id"]) == ["s1", "s3", "s5"]
    assert summary.skipped == {"malformed_json": 1, "empty_target": 1, "duplicate_sample_id": 1,
                               "unknown_task": 1, "not_an_object": 1}


def test_tasks_outside_subset_are_filtered_not_errors(tmp_path):
    path = write_lines(tmp_path / "train.json", [record(), record(task="Other", sample_id="s2"),
                                                  record(task="Other", sample_id="s3", target="")])
    dataset, summary = read_records(path, tasks=["A"], vocab=TaskVocab(["A"]))
    assert list(dataset["sample_id"]) == ["s1"] and summary.filtered == {"Other": 2}


def test_firefly_and_generic_jsonl_fields(tmp_path):
    firefly = write_lines(tmp_path / "train.json", [
        {"kind": "NER", "input": "找出人名：张三来了", "target": "张三"},
        {"kind": "MRC", "input": "阅读", "target": "答"}])
    dataset, _ = read_records(firefly, data_format="firefly", task_field="task_dataset")  # ignored
    assert list(dataset["task_dataset"]) == ["NER", "MRC"]
    assert list(dataset["sample_id"]) == ["train-1", "train-2"]
    generic = write_lines(tmp_path / "mine.json", [{"q": "问", "a": "答", "t": "T1", "id": 7}])
    dataset, _ = read_records(generic, data_format="jsonl", input_field="q", target_field="a",
                              task_field="t", id_field="id")
    assert dataset[0]["input"] == "问" and dataset[0]["sample_id"] == "7"
    with pytest.raises(ValueError, match="needs input_field"):
        read_records(generic, data_format="jsonl", target_field="a", task_field="t")
    with pytest.raises(DataError, match=r"mine\.json:1: missing field 'input'"):
        read_records(generic, data_format="firefly")


def test_missing_data_says_where_to_get_it(tmp_path):
    calls = {tmp_path / "nowhere": lambda: load_splits(tmp_path / "nowhere"),
             tmp_path / "train.json": lambda: read_records(tmp_path / "train.json")}
    for missing, call in calls.items():
        with pytest.raises(FileNotFoundError) as err:
            call()
        for needle in (str(missing), "github.com/michael-wzhu/PromptCBLUE",
                       "YeungNLP/firefly-train-1.1M", "DIR/train.json, DIR/dev.json, DIR/test.json"):
            assert needle in str(err.value)
    write_lines(tmp_path / "train.json", [record()])
    with pytest.raises(FileNotFoundError, match="lacks dev.json, test.json"):
        load_splits(tmp_path)


def test_caps_are_seeded_and_keep_file_order(tmp_path):
    rows = [record(task=f"T{i % 3}", sample_id=f"s{i}") for i in range(60)]
    path = write_lines(tmp_path / "train.json", rows)
    picks = {seed: read_records(path, max_per_task=5, seed=seed) for seed in (0, 0, 1)}
    dataset, summary = picks[0]
    again, _ = read_records(path, max_per_task=5, seed=0)
    assert list(again["sample_id"]) == list(dataset["sample_id"])
    assert Counter(dataset["task_dataset"]) == {"T0": 5, "T1": 5, "T2": 5}
    assert summary.capped == {"T0": 15, "T1": 15, "T2": 15}
    assert list(dataset["line_number"]) == sorted(dataset["line_number"])
    assert list(picks[1][0]["sample_id"]) != list(dataset["sample_id"])
    uncapped, _ = read_records(path, max_per_task=0)
    assert len(uncapped) == 60


def test_split_per_task_is_disjoint_and_seeded(tmp_path):
    path = write_lines(tmp_path / "all.json", [record(task=f"T{i % 2}", sample_id=f"s{i}")
                                               for i in range(40)])
    dataset, _ = read_records(path)
    sizes = {"train": 10, "dev": 4, "test": 3}
    splits = split_per_task(dataset, sizes, seed=5)
    ids = {split: set(part["sample_id"]) for split, part in splits.items()}
    assert {split: Counter(part["task_dataset"]) for split, part in splits.items()} == {
        split: {"T0": size, "T1": size} for split, size in sizes.items()}
    assert not (ids["train"] & ids["dev"] or ids["train"] & ids["test"] or ids["dev"] & ids["test"])
    assert {s: set(p["sample_id"]) for s, p in split_per_task(dataset, sizes, seed=5).items()} == ids
    with pytest.raises(ValueError, match="has 20 records"):
        split_per_task(dataset, {"train": 21})


def test_write_records_round_trip(tmp_path, promptcblue_dir):
    dataset, _ = read_records(promptcblue_dir / "dev.json")
    write_records(dataset, tmp_path / "copy.json")
    assert raw_lines(tmp_path / "copy.json") == raw_lines(promptcblue_dir / "dev.json")


def test_task_vocab_save_load_round_trip(tmp_path):
    vocab = TaskVocab(FIREFLY_PAPER_TASKS)
    vocab.save(tmp_path / "run" / "tasks.json")
    loaded = TaskVocab.load(tmp_path / "run" / "tasks.json")
    assert loaded == vocab and loaded.id("NLI") == 7 and loaded.name(0) == "TextCorrection"
    assert json.loads((tmp_path / "run" / "tasks.json").read_text())["tasks"][3] == "TextMatching"
    assert TaskVocab.from_data(["b", "a", "b", "c"]).tasks == ("a", "b", "c")
    with pytest.raises(ValueError, match="twice"):
        TaskVocab(["a", "b", "a"])
    with pytest.raises(KeyError, match="'zz' is not in the task vocabulary"):
        vocab.id("zz")
    (tmp_path / "bad.json").write_text('{"names": []}')
    with pytest.raises(ValueError, match="bad.json"):
        TaskVocab.load(tmp_path / "bad.json")
