"""Tests for cgc_lora_jax/demo_data.py and cgc_lora_jax/demo_tokenizer.py: the generated demo
dataset is deterministic, PromptCBLUE-shaped, self-consistent (each target follows from its
input), readable by cgc_lora_jax.data; the character tokenizer round-trips and plugs into the
ChatGLM v1 formatting; the per-task scores are right on hand-made cases."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from cgc_lora_jax import demo_data
from cgc_lora_jax.data import load_splits
from cgc_lora_jax.demo_data import (CATEGORIES, CHINESE_DIGITS, COLOURS, TASK_NAMES, demo_records,
                                    score_task, write_demo_dataset)
from cgc_lora_jax.demo_tokenizer import DemoTokenizer
from cgc_lora_jax.formatting import IGNORE, encode_split, load_tokenizer

FIELDS = {"input", "target", "answer_choices", "task_type", "task_dataset", "sample_id"}
ROUGE_IDENTICAL = 2 * (1 / (2 + 1e-8))


@pytest.fixture(scope="module")
def records():
    return demo_records(seed=0)


def test_deterministic_from_seed(records):
    assert demo_records(seed=0) == records
    assert demo_records(seed=1)["train"] != records["train"]


def test_format_sizes_and_unique_inputs(records):
    assert {split: len(rows) for split, rows in records.items()} == {"train": 768, "dev": 96,
                                                                      "test": 96}
    inputs = Counter()
    for split, rows in records.items():
        assert Counter(r["task_dataset"] for r in rows) == {t: len(rows) // 3 for t in TASK_NAMES}
        assert [r["sample_id"] for r in rows] == [f"{split}-{i}" for i in range(len(rows))]
        for row in rows:
            assert set(row) == FIELDS and row["target"] and len(row["input"]) < 64
            inputs[(row["task_dataset"], row["input"])] += 1
    assert max(inputs.values()) == 1  # dev and test inputs never appear in train
    first_tasks = [r["task_dataset"] for r in records["train"][:12]]
    assert len(set(first_tasks)) > 1  # shuffled across tasks


def test_targets_follow_from_inputs(records):
    colour_pattern = "|".join(COLOURS)
    label_of = {item: label for label, items in CATEGORIES.items() for item in items}
    no_colour = 0
    for row in (r for rows in records.values() for r in rows):
        task, text, target = row["task_dataset"], row["input"], row["target"]
        if task == "ColourExtraction":
            sentence = text.split("：", 1)[1]
            colours = list(dict.fromkeys(re.findall(colour_pattern, sentence)))
            assert target == "颜色：" + ("，".join(colours) or "无")
            no_colour += not colours
            assert row["task_type"] == "extraction"
        elif task == "CategoryClassification":
            sentence = text.split("\n", 1)[0]
            labels = [label for item, label in label_of.items() if sentence.endswith(item)]
            assert [target] == labels and row["answer_choices"] == list(CATEGORIES)
        else:
            digits = re.search(r"：(\d+)\n", text).group(1)
            assert target == "".join(CHINESE_DIGITS[int(d)] for d in digits)
    assert 0 < no_colour < 0.3 * 384


def test_written_dataset_reads_back_with_targets(tmp_path, records):
    paths = write_demo_dataset(tmp_path / "data", seed=0)
    assert sorted(p.name for p in paths.values()) == ["dev.json", "test.json", "train.json"]
    splits = load_splits(tmp_path / "data", data_format="promptcblue")  # test.json keeps its targets
    assert splits.vocab.tasks == tuple(sorted(TASK_NAMES))
    for split, dataset in splits.datasets.items():
        assert list(dataset["target"]) == [r["target"] for r in records[split]]


def test_tokenizer_covers_the_data_and_round_trips(tmp_path, records):
    tok = DemoTokenizer.build()
    unk = tok.special_ids["<unk>"]
    for row in records["train"]:
        for text in (row["input"], row["target"]):
            ids = tok.encode(text, add_special_tokens=False)
            assert unk not in ids and tok.decode(ids) == text
    ids = tok.encode("红色")
    assert ids[-2:] == [tok.gmask_token_id, tok.sop_token_id] == [3, 4]
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.mask_token_id) == (1, 5, 4, 2)
    assert tok.encode("红?", add_special_tokens=False)[1] == unk and tok.decode([unk, 1, 5]) == ""
    tok.save(tmp_path / "tok")
    loaded = load_tokenizer("chatglm", tmp_path / "tok")
    assert isinstance(loaded, DemoTokenizer) and loaded.tokens == tok.tokens
    batch = loaded(["红色", "小明买了"])  # the ChatGLM v1 batch call, left-padded
    np.testing.assert_array_equal(batch["input_ids"][0, :2], [1, 1])
    np.testing.assert_array_equal(batch["position_ids"][1], [[0, 1, 2, 3, 4, 4], [0, 0, 0, 0, 0, 1]])


def test_chatglm_v1_formatting_applies(records):
    from cgc_lora_jax.task_vocab import TaskVocab

    tok = DemoTokenizer.build()
    rows = records["dev"][:6]
    split = encode_split(rows, tok, family="chatglm", vocab=TaskVocab(TASK_NAMES))
    for row, ids, labels in zip(rows, split.input_ids, split.labels):
        context = len(row["input"]) + 1
        assert list(ids[:context]) == tok.encode(row["input"])[:-1]
        assert list(labels[:context]) == [IGNORE] * context
        assert tok.decode(ids[context:]) == row["target"] and ids[-1] == tok.eos_token_id


def test_scores_on_hand_made_cases(records):
    assert score_task("ColourExtraction", ["颜色：红色，蓝色"], ["颜色：红色"]) == pytest.approx(2 / 3)
    assert score_task("ColourExtraction", ["颜色：无", "颜色：红色"], ["颜色：无", "颜色：绿色"]) == 0.0
    assert score_task("CategoryClassification", ["水果", "动物"], ["水果 ", "水果"]) == 0.5
    # LCS("三零五", "三五") = 2: P = 1, R = 2/3.
    expected = 2 * ((1 * 2 / 3) / (1 + 2 / 3 + 1e-8))
    assert score_task("DigitsToChinese", ["三零五"], ["三五"]) == pytest.approx(expected, abs=1e-12)
    for task in TASK_NAMES:
        gold = [r["target"] for r in records["test"] if r["task_dataset"] == task]
        perfect = score_task(task, gold, gold)
        expected = ROUGE_IDENTICAL if task == "DigitsToChinese" else 1.0
        assert perfect == pytest.approx(expected, abs=1e-12)
    with pytest.raises(KeyError):
        demo_data.canonical_task("CMeIE")
