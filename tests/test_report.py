"""cgc_lora_jax/evaluation/report.py: the results table against hand-written Markdown, scores
files round-trip, comparison folders, and the errors that name the file."""

import json

import pytest

from cgc_lora_jax.evaluation.report import compare, markdown_table, read_runs, read_scores, run_names, write_scores

PNG = b"\x89PNG\r\n\x1a\n"


def test_markdown_table_percentages_column_order_and_missing_cells():
    rows = {"cgc": {"A": 0.41127, "B": 0.872, "average": 0.641635}, "lora": {"B": 0.5, "C": 1.0, "average": 0.75}}
    assert markdown_table(rows) == (
        "| run | A | B | C | Avg. |\n"
        "|---|---|---|---|---|\n"
        "| cgc | 41.13 | 87.20 | - | 64.16 |\n"
        "| lora | - | 50.00 | 100.00 | 75.00 |\n")


def test_write_read_and_compare(tmp_path):
    scores = {"A": 0.25, "B": 0.75, "average": 0.5}
    for name in ("x", "y"):
        (tmp_path / name).mkdir()
        table = write_scores(tmp_path / name, "test", scores, name)
        assert table == markdown_table({name: scores})
        assert json.loads((tmp_path / name / "scores_test.json").read_text()) == scores
        assert (tmp_path / name / "scores_test.md").read_text() == table
        assert (tmp_path / name / "scores_test.png").read_bytes()[:8] == PNG
    assert read_scores(tmp_path / "x", "test") == scores
    table, chart = compare([tmp_path / "x", tmp_path / "y"], "test")
    assert chart == tmp_path / "compare_test.png" and chart.read_bytes()[:8] == PNG
    assert chart.with_suffix(".md").read_text() == table == markdown_table({"x": scores, "y": scores})


def test_run_names_disambiguate_and_errors_name_the_file(tmp_path):
    assert run_names(["a/run", "b/run", "c/other"]) == ["a/run", "b/run", "other"]
    with pytest.raises(FileNotFoundError, match="eval.py --workdir"):
        read_scores(tmp_path, "test")
    (tmp_path / "scores_test.json").write_text("{not json")
    with pytest.raises(ValueError, match="scores_test.json: not JSON"):
        read_scores(tmp_path, "test")
    (tmp_path / "scores_test.json").write_text('{"A": 1.0}')
    with pytest.raises(ValueError, match="average"):
        read_scores(tmp_path, "test")
    with pytest.raises(ValueError, match="at least one"):
        read_runs([], "test")
