"""eval.py on a tiny trained demo run: every output file, the submission format, merged == fused,
the score command, compare, and errors that name the missing path."""

import json
import shutil

import jax
import numpy as np
import pytest

from cgc_lora_jax.cli import eval as eval_cli
from cgc_lora_jax.run import load_adapters, save_adapters
from cgc_lora_jax.config import load_config
from cgc_lora_jax.scoring import score_files
from cgc_lora_jax.training.loop import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY_RUN = ["train.steps=20", "train.batch_size=8", "train.eval_every=0", "train.checkpoint_every=20",
            "train.log_every=10", "mesh.data=1", "eval.max_new_tokens=8", "eval.batch_size=32"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 20-step CGC-LoRA demo run whose experts are then replaced by large random ones.

    The tiny random base copies its last input token (<sop>, which decodes to "") until the
    adapters grow large, which takes hundreds of steps; after 20 steps the answers are "" or one
    repeated character per task, and merged == fused would compare near-constant strings. So the
    trained gate is kept and every expert is redrawn (A std 0.02 as at init, B std 10, seeded),
    which gives diverse answers.
    """
    workdir = tmp_path_factory.mktemp("runs") / "cgc_demo"
    train(load_config("demo_tiny", TINY_RUN), workdir)
    adapters, meta = load_adapters(workdir / "adapters")
    rng = np.random.default_rng(0)
    std = {"A": 0.02, "B": 10.0}
    redrawn = jax.tree_util.tree_map_with_path(
        lambda path, x: std[path[-1].key] * rng.standard_normal(x.shape).astype(x.dtype) if path[-1].key in std else x,
        adapters)
    save_adapters(workdir / "adapters", redrawn, meta)
    return workdir


@pytest.fixture(scope="module")
def merged(run_dir):
    assert eval_cli.main(["--workdir", str(run_dir)]) == 0
    return run_dir


@pytest.fixture(scope="module")
def fused(run_dir, merged):
    out = run_dir.parent / "cgc_demo_fused"
    assert eval_cli.main(["--workdir", str(run_dir), "--fused", "--out", str(out)]) == 0
    return out


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_eval_writes_predictions_scores_table_and_chart(merged):
    for name in ("predictions_test.jsonl", "scores_test.json", "scores_test.md", "scores_test.png"):
        assert (merged / name).is_file(), name
    assert (merged / "scores_test.png").read_bytes()[:8] == PNG_MAGIC
    scores = json.loads((merged / "scores_test.json").read_text())
    tasks = ("ColourExtraction", "CategoryClassification", "DigitsToChinese")
    assert list(scores) == [*tasks, "average"]
    assert scores["average"] == pytest.approx(sum(scores[t] for t in tasks) / 3)
    table = (merged / "scores_test.md").read_text()
    assert table.splitlines()[0] == "| run | " + " | ".join(tasks) + " | Avg. |"
    assert table.splitlines()[2] == "| cgc_demo | " + " | ".join(f"{100 * scores[t]:.2f}" for t in tasks) + \
        f" | {100 * scores['average']:.2f} |"


def test_predictions_are_every_input_record_with_target_replaced(merged):
    gold = read_jsonl(merged / "data" / "test.json")
    predictions = read_jsonl(merged / "predictions_test.jsonl")
    assert len(predictions) == len(gold) == 96
    for pred, record in zip(predictions, gold):
        assert list(pred) == list(record)  # the same fields in the same order
        assert {k: v for k, v in pred.items() if k != "target"} == {k: v for k, v in record.items() if k != "target"}
        assert isinstance(pred["target"], str)
    assert sum(p["target"] != g["target"] for p, g in zip(predictions, gold)) > 0  # outputs, not the gold


def test_score_command_writes_what_score_files_returns(merged, tmp_path, capsys):
    pred, gold, out = merged / "predictions_test.jsonl", merged / "data" / "test.json", tmp_path / "s" / "SCORES.json"
    assert eval_cli.main(["score", "--pred", str(pred), "--gold", str(gold), "--out", str(out),
                          "--benchmark", "demo"]) == 0
    written = json.loads(out.read_text())
    assert written == score_files(pred, gold, benchmark="demo")
    assert written == json.loads((merged / "scores_test.json").read_text())
    assert "Avg." in capsys.readouterr().out


def test_fused_and_merged_give_the_same_predictions(merged, fused):
    by_merged = read_jsonl(merged / "predictions_test.jsonl")
    by_fused = read_jsonl(fused / "predictions_test.jsonl")
    assert [p["sample_id"] for p in by_fused] == [p["sample_id"] for p in by_merged]
    assert len({p["target"] for p in by_merged}) > 48  # diverse answers (96 prompts), not all ""
    assert [p["target"] for p in by_fused] == [p["target"] for p in by_merged]
    assert json.loads((fused / "scores_test.json").read_text()) == json.loads((merged / "scores_test.json").read_text())


def test_compare_prints_both_runs_and_writes_a_chart(merged, fused, tmp_path, capsys):
    chart = tmp_path / "table.png"
    assert eval_cli.main(["compare", str(merged), str(fused), "--chart", str(chart)]) == 0
    out = capsys.readouterr().out
    scores = json.loads((merged / "scores_test.json").read_text())
    rows = [line for line in out.splitlines() if line.startswith("| cgc_demo")]
    assert [row.split(" | ")[0] for row in rows] == ["| cgc_demo", "| cgc_demo_fused"]
    assert all(row.endswith(f"| {100 * scores['average']:.2f} |") for row in rows)
    assert chart.read_bytes()[:8] == PNG_MAGIC
    assert chart.with_suffix(".md").read_text().splitlines()[2:] == rows


def test_errors_name_the_missing_path(run_dir, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert eval_cli.main(["--workdir", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err

    untrained = tmp_path / "untrained"
    untrained.mkdir()
    shutil.copy(run_dir / "config.json", untrained / "config.json")
    assert eval_cli.main(["--workdir", str(untrained)]) == 2
    assert str(untrained / "adapters") in capsys.readouterr().err

    assert eval_cli.main(["--workdir", str(run_dir), "--split", "valid"]) == 2
    err = capsys.readouterr().err
    assert str(run_dir / "data") in err and "valid.json" in err

    assert eval_cli.main(["compare", str(run_dir), str(untrained)]) == 2
    assert str(untrained / "scores_test.json") in capsys.readouterr().err
