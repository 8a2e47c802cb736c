"""In-context prompts: k solved examples of the query's own task before it, seeded, within budget."""

import pytest

from cgc_lora_jax.evaluation.icl import SEPARATOR, choose_examples, icl_prompt, icl_records

TASKS = ("TaskA", "TaskB", "TaskC")


def make_train():
    return [{"sample_id": f"train-{task}-{i}", "task_dataset": task, "input": f"{task} question {i}\n答：",
             "target": f"{task} answer {i}"} for task in TASKS for i in range(12)]


def make_queries():
    return [{"sample_id": f"test-{n}", "task_dataset": TASKS[n % 3], "input": f"{TASKS[n % 3]} query {n}\n答：",
             "target": f"gold {n}", "answer_choices": ["x"]} for n in range(9)]


def solved(example):
    return example["input"] + example["target"]


def test_k_examples_of_the_same_task_come_before_the_query():
    train = make_train()
    by_text = {solved(ex): ex for ex in train}
    result = icl_records(make_queries(), train, shots=3, seed=0)
    for query, record, kept in zip(make_queries(), result.records, result.examples):
        pieces = record["input"].split(SEPARATOR)
        assert pieces[-1] == query["input"]  # the query last, untouched
        assert len(pieces) == 4
        examples = [by_text[p] for p in pieces[:-1]]  # KeyError if a piece is not a solved example
        assert all(ex["task_dataset"] == query["task_dataset"] for ex in examples)
        assert len({ex["sample_id"] for ex in examples}) == 3
        assert kept == [ex["sample_id"] for ex in examples]
        assert {k: v for k, v in record.items() if k != "input"} == {k: v for k, v in query.items() if k != "input"}
    assert result.dropped == 0


def test_prompt_layout_is_solved_examples_then_query():
    examples = [{"input": "问1\n答：", "target": "甲"}, {"input": "问2\n答：", "target": "乙"}]
    assert icl_prompt(examples, "问3\n答：") == "问1\n答：甲\n\n问2\n答：乙\n\n问3\n答："
    assert icl_prompt([], "问3\n答：") == "问3\n答："


def test_deterministic_by_seed_and_independent_of_query_order():
    train, queries = make_train(), make_queries()
    first = icl_records(queries, train, shots=4, seed=7)
    again = icl_records(queries, train, shots=4, seed=7)
    assert first.records == again.records
    reversed_run = icl_records(queries[::-1], train, shots=4, seed=7)
    assert reversed_run.records[::-1] == first.records
    other = icl_records(queries, train, shots=4, seed=8)
    assert other.records != first.records
    # different queries of one task get different draws
    assert len({tuple(kept) for kept in first.examples[::3]}) > 1


def test_the_query_itself_is_never_an_example():
    train = make_train()
    query = dict(train[5], sample_id="test-0")  # the same input appears in training
    pool = [ex for ex in train if ex["task_dataset"] == query["task_dataset"]]
    for seed in range(20):
        assert all(ex["input"] != query["input"] for ex in choose_examples(pool, query, 11, seed))
    assert len(choose_examples(pool, query, 50, 0)) == 11  # fewer when the pool is smaller


def test_budget_drops_the_earliest_examples_and_keeps_the_query():
    train, queries = make_train(), make_queries()
    full = icl_records(queries, train, shots=3, seed=1)
    query_len, example_len = len(queries[0]["input"]), len(solved(train[0])) + len(SEPARATOR)
    budget = query_len + 2 * example_len  # room for two examples of the first query
    trimmed = icl_records(queries[:1], train, shots=3, seed=1, count_tokens=len, max_tokens=budget)
    assert trimmed.examples[0] == full.examples[0][1:]
    assert trimmed.records[0]["input"].endswith(SEPARATOR + queries[0]["input"])
    assert len(trimmed.records[0]["input"]) <= budget
    assert trimmed.dropped == 1
    tiny = icl_records(queries[:1], train, shots=3, seed=1, count_tokens=len, max_tokens=1)
    assert tiny.records[0]["input"] == queries[0]["input"] and tiny.dropped == 3


def test_a_task_without_training_examples_is_an_error():
    queries = [{"sample_id": "q", "task_dataset": "Unknown", "input": "x", "target": "y"}]
    with pytest.raises(ValueError, match="no example of task 'Unknown'"):
        icl_records(queries, make_train(), shots=2, seed=0)
    assert icl_records(queries, make_train(), shots=0, seed=0).records[0]["input"] == "x"


def test_eval_icl_prompts_the_base_model_and_writes_the_original_records(tmp_path):
    """`eval.py icl` end to end on the demo (2 test prompts per task, 2 shots)."""
    import json

    from cgc_lora_jax.cli import eval as eval_cli

    out = tmp_path / "icl"
    assert eval_cli.main(["icl", "--config", "demo_tiny", "--shots", "2", "--out", str(out), "--seed", "5",
                          "--config.data.max_eval_per_task=2", "--config.eval.max_new_tokens=4",
                          "--config.data.max_source_len=224"]) == 0
    read = lambda path: [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = {r["sample_id"]: r for r in read(out / "data" / "train.json")}
    gold = {r["sample_id"]: r for r in read(out / "data" / "test.json")}
    predictions = read(out / "predictions_test.jsonl")
    assert len(predictions) == 6
    for pred in predictions:  # the original input, not the in-context prompt
        assert {k: v for k, v in pred.items() if k != "target"} == {k: v for k, v in gold[pred["sample_id"]].items() if k != "target"}
    icl = json.loads((out / "icl.json").read_text())
    assert icl["settings"]["shots"] == 2 and icl["settings"]["seed"] == 5 and icl["settings"]["dropped_examples"] == 0
    for sample_id, examples in icl["examples"].items():
        assert len(examples) == 2
        assert all(train[e]["task_dataset"] == gold[sample_id]["task_dataset"] for e in examples)
    first = predictions[0]
    expected = icl_records([gold[first["sample_id"]]], list(train.values()), shots=2, seed=5)
    assert icl["settings"]["first_prompt"] == expected.records[0]["input"]
    assert (out / "scores_test.json").is_file() and (out / "scores_test.png").is_file()
