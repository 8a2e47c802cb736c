"""Tests for cgc_lora_jax/demo (the English reading tasks, the generated-dataset registry and the
base-vs-trained comparison): the data is deterministic, PromptCBLUE-shaped and self-consistent
(each target follows from its sentence by the task's rule, re-derived here independently), the
scorer matches hand-worked cases, and the comparison's two rows equal the scores of the two
independent paths they stand for (the base alone through the in-context path with 0 shots; the
trained run through eval.py)."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from cgc_lora_jax.data.records import load_splits
from cgc_lora_jax.demo import english
from cgc_lora_jax.run import GENERATED_DATASETS, data_folder
from cgc_lora_jax.demo.english import ANTONYMS, CITIES, NEGATIVE, POSITIVE, TASK_NAMES, normalise, records, score_task
from cgc_lora_jax.config import load_config
from cgc_lora_jax.scoring import ScoringError, score_files, score_records

FIELDS = {"input", "target", "answer_choices", "task_type", "task_dataset", "sample_id"}


@pytest.fixture(scope="module")
def data():
    return records(seed=0)


def test_deterministic_sized_shuffled_and_unseen(data):
    assert records(seed=0) == data and records(seed=1)["train"] != data["train"]
    sizes = english.SPLIT_SIZES
    sentences = Counter()
    for split, rows in data.items():
        assert Counter(r["task_dataset"] for r in rows) == {t: sizes[split] for t in TASK_NAMES}
        assert [r["sample_id"] for r in rows] == [f"{split}-{i}" for i in range(len(rows))]
        for row in rows:
            assert set(row) == FIELDS and row["target"] and len(row["input"]) < 90
            sentences[(row["task_dataset"], row["input"])] += 1
    assert max(sentences.values()) == 1  # no dev or test sentence is in train
    assert len({r["task_dataset"] for r in data["train"][:9]}) > 1


def _sentence(row):
    return row["input"].split("? ", 1)[1]


def test_targets_follow_from_the_sentences(data):
    label_of = {**{a: "positive" for a in POSITIVE}, **{a: "negative" for a in NEGATIVE}}
    seen = Counter()
    for row in (r for rows in data.values() for r in rows):
        task, sentence, target = row["task_dataset"], _sentence(row), row["target"]
        words = re.findall(r"[a-z]+", sentence.lower())
        seen[(task, target)] += 1
        if task == "CityExtraction":
            assert [c for c in CITIES if c in sentence] == [target] and row["task_type"] == "extraction"
        elif task == "ReviewSentiment":
            [adjective] = [w for w in words if w in label_of]
            assert target == label_of[adjective] and row["answer_choices"] == ["positive", "negative"]
        else:
            [adjective] = [w for w in words if w in ANTONYMS]
            assert target == ANTONYMS[adjective] and row["task_type"] == "generation"
    assert seen[("ReviewSentiment", "positive")] > 100 and seen[("ReviewSentiment", "negative")] > 100
    assert len({t for task, t in seen if task == "CityExtraction"}) > 20


def test_antonyms_have_one_answer():
    for adjective, opposite in ANTONYMS.items():
        assert adjective != opposite
        if opposite in ANTONYMS:  # a pair asked both ways answers both ways
            assert ANTONYMS[opposite] == adjective
    assert not {"short", "light", "old", "hard"} & set(ANTONYMS)  # two common opposites each


def test_scorer_on_hand_worked_cases():
    assert normalise('  "Madrid." ') == "madrid" and normalise("New York!") == "new york"
    assert score_task("CityExtraction", ["Madrid", "New York"], ["madrid.", "The city is New York."]) == 0.5
    assert score_task("ReviewSentiment", ["positive", "negative", "negative"],
                      ["Positive", "negative!", "positive"]) == pytest.approx(2 / 3)
    assert score_task("Antonym", ["cold", "big"], ["Cold.", "The opposite is small"]) == 0.5
    assert score_task("Antonym", [], []) == 0.0
    with pytest.raises(ValueError):
        score_task("Antonym", ["a"], [])
    with pytest.raises(KeyError):
        score_task("Spelling", ["a"], ["a"])


def test_written_files_read_back_and_score_by_name(tmp_path, data):
    assert GENERATED_DATASETS["demo_en"] is english.write_dataset
    data_cfg = load_config("demo").data  # the real-base demo's data section (reading it fetches nothing)
    folder = data_folder(data_cfg, tmp_path)  # written into WORKDIR/data on first use
    assert folder == tmp_path / "data"
    (folder / "train.json").write_text("[]")  # already there: kept, not rewritten
    assert data_folder(data_cfg, tmp_path) == folder and (folder / "train.json").read_text() == "[]"
    english.write_dataset(folder, seed=0)
    splits = load_splits(folder, data_format="demo_en")
    assert splits.vocab.tasks == tuple(sorted(TASK_NAMES))
    assert list(splits.datasets["test"]["target"]) == [r["target"] for r in data["test"]]
    gold = folder / "test.json"
    preds = [dict(r, target=r["target"] if r["task_dataset"] == "Antonym" else "no idea") for r in data["test"]]
    pred = tmp_path / "pred.jsonl"
    pred.write_text("".join(json.dumps(p) + "\n" for p in preds))
    scores = score_files(pred, gold, benchmark="demo_en")
    assert scores == {"CityExtraction": 0.0, "ReviewSentiment": 0.0, "Antonym": 1.0, "average": pytest.approx(1 / 3)}
    with pytest.raises(ScoringError, match="no prediction"):
        score_records(preds[1:], data["test"], benchmark="demo_en")


@pytest.mark.slow
def test_base_and_trained_rows_equal_the_independent_paths(tmp_path, capsys):
    """On a 3-step run of the offline demo: the "base" row equals the base scored through the
    in-context path with 0 shots (its own base load and prompts), and the "trained" row equals
    eval.py's merged evaluation of the run; both rows and demo_scores.json agree."""
    from cgc_lora_jax.evaluation.compare import SCORES_FILE, compare_base_and_trained
    from cgc_lora_jax.evaluation.evaluate import evaluate_run
    from cgc_lora_jax.evaluation.icl import run_icl
    from cgc_lora_jax.training.loop import train

    overrides = ["train.steps=3", "train.batch_size=8", "train.eval_every=0", "train.checkpoint_every=3",
                 "mesh.data=1", "data.max_eval_per_task=3", "eval.max_new_tokens=6", "eval.batch_size=9"]
    workdir = tmp_path / "run"
    train(load_config("demo_tiny", overrides), workdir)
    scores = compare_base_and_trained(workdir)
    out = capsys.readouterr().out
    assert "| base (no adapters) |" in out and "| trained |" in out and "gold" in out
    assert json.loads((workdir / SCORES_FILE).read_text()) == scores
    assert scores["trained"] == evaluate_run(workdir, out_dir=tmp_path / "eval")
    assert scores["base"] == run_icl(load_config("demo_tiny", overrides), tmp_path / "icl0", shots=0)
    assert set(scores["base"]) == {"ColourExtraction", "CategoryClassification", "DigitsToChinese", "average"}
