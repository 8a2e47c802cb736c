"""bench/paper_table.py without training: every row at the config's total rank and in the shape
its name says (against explicit layouts of the paper's baselines, and the same as the named
configs), mean +- sample std over seeds against numpy, and a finished table folder is skipped and
summarised, not redone."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from cgc_lora_jax.config import load_config
from cgc_lora_jax.layers import CGCLoRAConfig
from cgc_lora_jax.run import lora_config
from test_config import BASELINES

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("paper_table", ROOT / "bench" / "paper_table.py")
paper_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(paper_table)


def row_lora(row: str) -> CGCLoRAConfig:
    return lora_config(paper_table.row_config(row, "med8", []).lora, 8)


def test_every_row_has_the_total_rank_and_its_shape():
    cgc = row_lora("cgc_lora")
    assert cgc.total_rank == 4 * 2 + 8 * 1 == 16
    keep = dict(alpha=cgc.alpha, task_embed_dim=cgc.task_embed_dim, dropout=cgc.dropout, init_std=cgc.init_std,
                targets=cgc.targets)
    assert row_lora("lora_full") == CGCLoRAConfig(8, num_common=1, common_rank=16, specific_rank=0, gate="uniform",
                                                  **keep)
    assert row_lora("lora_single") == row_lora("lorahub") == CGCLoRAConfig(8, num_common=0, common_rank=0,
                                                                           specific_rank=2, gate="uniform", **keep)
    assert row_lora("moelora") == CGCLoRAConfig(8, num_common=8, common_rank=2, specific_rank=0, **keep)
    assert row_lora("no_gate") == dataclasses.replace(cgc, gate="uniform")
    assert row_lora("per_layer_gates") == dataclasses.replace(cgc, gate="per_layer")
    assert {row_lora(r).total_rank for r in paper_table.ROWS if r != "icl"} == {16}
    # the same definition as the named configs and the layer's constructors
    for row in BASELINES:
        paper = load_config(row)
        assert paper.to_dict() == paper_table.row_config(row, "promptcblue", []).to_dict()
    assert row_lora("lora_full") == CGCLoRAConfig.lora_full(8, 16, **keep)
    assert row_lora("moelora") == CGCLoRAConfig.moe_lora(8, 8, 2, **keep)
    with pytest.raises(ValueError, match="does not split"):
        seven = ",".join(load_config("med8").data.tasks[:7])
        paper_table.row_config("lora_single", "med8", [f"data.tasks={seven}"])
    with pytest.raises(SystemExit):  # a row that cannot be made is refused before anything trains
        paper_table.main(["--config", "demo_tiny", "--out", "unused", "--rows", "lora_full"])


def test_finished_folders_are_skipped_and_summarised(tmp_path, capsys):
    dev = {"lora_full": [[0.5, 0.7], [0.25, 0.35]], "cgc_lora": [[0.6, 0.8], [0.1, 0.3]], "icl": [[0.1, 0.2]]}
    for row, per_seed in dev.items():
        for seed, (a, b) in enumerate(per_seed):
            folder = tmp_path / row / f"seed{seed}"
            folder.mkdir(parents=True)
            (folder / "scores_dev.json").write_text(json.dumps({"KUAKE-QIC": a, "CHIP-CTC": b, "average": (a + b) / 2}))
            (folder / paper_table.DONE).write_text("{}")
    paper_table.main(["--config", "med8", "--out", str(tmp_path), "--rows", "icl,lora_full,cgc_lora", "--seeds", "2"])
    out = capsys.readouterr().out
    assert out.count("done, skipped") == 5
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["CGC-LoRA"]["KUAKE-QIC"] == [0.6, 0.1] and table["In-context"]["average"] == [pytest.approx(0.15)]
    values = 100 * np.array([0.6, 0.1])
    row = next(line for line in out.splitlines() if line.startswith("| CGC-LoRA |"))
    assert row.split(" | ")[2] == f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"
    assert (tmp_path / "table_dev.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads(out.strip().splitlines()[-1])["total_seconds"] == 0


def finished_folders(out: Path, averages: dict) -> None:
    """A finished folder (done.json, a dev score) per row and seed of {row: {seed: average}}."""
    for row, per_seed in averages.items():
        for seed, avg in per_seed.items():
            folder = out / row / f"seed{seed}"
            folder.mkdir(parents=True)
            (folder / "scores_dev.json").write_text(json.dumps({"KUAKE-QIC": avg, "average": avg}))
            (folder / paper_table.DONE).write_text("{}")


def test_cgc_lora_minus_each_row_is_paired_by_seed_with_a_t_interval(tmp_path, capsys):
    """Pairs by seed number (a row missing a seed pairs on the rest), the interval against float64
    numpy and the published t quantile, and the reading flips only when the interval excludes 0."""
    averages = {"cgc_lora": {0: 0.30, 1: 0.32, 2: 0.31}, "lora_full": {0: 0.20, 1: 0.23, 2: 0.21},
                "moelora": {0: 0.26}, "no_gate": {0: 0.40, 2: 0.20}}
    finished_folders(tmp_path, averages)
    paper_table.main(["--config", "med8", "--out", str(tmp_path), "--rows", "lora_full,moelora,cgc_lora,no_gate",
                      "--seeds", "3", "--other-seeds", "3", "--minutes", "0"])  # trains nothing missing
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in out.splitlines() if line.startswith("| ")}
    diffs = 100 * (np.array([0.30, 0.32, 0.31]) - np.array([0.20, 0.23, 0.21]))
    half = 4.302652729911275 * diffs.std(ddof=1) / np.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert rows["LoRA Full"][1:4] == ["0,1,2", "+10.00, +9.00, +10.00", f"+{diffs.mean():.2f} ± {diffs.std(ddof=1):.2f}"]
    assert rows["LoRA Full"][4] == f"+{diffs.mean() - half:.2f} .. +{diffs.mean() + half:.2f}"
    assert rows["LoRA Full"][5] == "CGC-LoRA ahead beyond the seed spread |"
    assert rows["MOE-LoRA"][1:5] == ["0", "+4.00", "+4.00", "–"] and "no spread" in rows["MOE-LoRA"][5]
    assert rows["w/o gate"][1:3] == ["0,2", "-10.00, +11.00"] and rows["w/o gate"][5] == "within the seed spread |"
    assert "| CGC-LoRA | 0," not in out  # the reference is not paired with itself
    figures = json.loads(out.strip().splitlines()[-1])["cgc_lora_minus"]
    assert figures == {"LoRA Full": pytest.approx(diffs.mean(), abs=0.005), "MOE-LoRA": 4.0, "w/o gate": 0.5}
    assert "paired by seed" in (tmp_path / "table_dev.md").read_text()


def test_runs_go_seed_by_seed_and_stop_starting_when_the_minutes_are_spent(tmp_path, capsys, monkeypatch):
    started = []

    def fake_run(row, seed, folder, args, splits):
        started.append((row, seed))
        folder.mkdir(parents=True)
        (folder / "scores_dev.json").write_text(json.dumps({"KUAKE-QIC": 0.5, "average": 0.5}))
        clock[0] += 400  # each run takes 400 s on the fake clock

    clock = [0.0]
    monkeypatch.setattr(paper_table, "run_row", fake_run)
    monkeypatch.setattr(paper_table.time, "perf_counter", lambda: clock[0])
    args = ["--config", "med8", "--out", str(tmp_path), "--rows", "lorahub,cgc_lora,lora_full,icl", "--seeds", "3"]
    paper_table.main([*args, "--minutes", "20"])  # 3 runs of 400 s fit before minute 20, the 4th starts at 1200 s
    order = [("icl", 0), ("lora_full", 0), ("lora_single", 0), ("cgc_lora", 0), ("lorahub", 0),
             ("lora_full", 1), ("cgc_lora", 1), ("lora_full", 2), ("cgc_lora", 2)]
    assert started == order[:3]
    out = capsys.readouterr().out
    assert out.count("not started, --minutes 20 spent") == len(order) - 3
    assert set(json.loads((tmp_path / "table.json").read_text())) == {"In-context", "LoRA Full", "LoRA Single"}
    paper_table.main(args)  # the same command without a budget finishes the table in the same order
    assert started == order
    with pytest.raises(SystemExit, match="nothing to tabulate"):
        paper_table.main(["--config", "med8", "--out", str(tmp_path / "empty"), "--rows", "cgc_lora", "--minutes", "0"])


def test_only_seeds_runs_those_seeds_and_the_table_shows_every_finished_one(tmp_path, capsys, monkeypatch):
    """Two processes share one table folder: one runs seed 1 alone, the other seeds 0 and 2."""
    started = []

    def fake_run(row, seed, folder, args, splits):
        started.append((row, seed))
        folder.mkdir(parents=True)
        (folder / "scores_dev.json").write_text(json.dumps({"KUAKE-QIC": seed / 10, "average": seed / 10}))

    monkeypatch.setattr(paper_table, "run_row", fake_run)
    args = ["--config", "med8", "--out", str(tmp_path), "--rows", "cgc_lora,icl", "--seeds", "3"]
    paper_table.main([*args, "--only-seeds", "1"])
    assert started == [("cgc_lora", 1)]  # icl has one seed (--other-seeds 1): not seed 1
    paper_table.main([*args, "--only-seeds", "2,0"])
    assert started == [("cgc_lora", 1), ("icl", 0), ("cgc_lora", 0), ("cgc_lora", 2)]
    assert json.loads((tmp_path / "table.json").read_text())["CGC-LoRA"]["average"] == [0.0, 0.1, 0.2]
    for bad in ("3", "x", "-1"):
        with pytest.raises(SystemExit):
            paper_table.main([*args, "--only-seeds", bad])
    assert "--only-seeds 3: the table has seeds 0-2" in capsys.readouterr().err


def test_the_table_shows_every_finished_folder_whichever_command_ran_it(tmp_path, capsys):
    """A --rows subset or a --quick run in a folder filled by earlier commands tabulates (and pairs)
    every finished row and seed there; a folder without done.json, or one that answered test only,
    and a stray folder name are left out."""
    averages = {"icl": {0: 0.05}, "lora_full": {0: 0.20, 1: 0.23, 2: 0.21}, "cgc_lora": {0: 0.30, 1: 0.32, 2: 0.31},
                "moelora": {0: 0.26}}
    finished_folders(tmp_path, averages)
    (tmp_path / "moelora" / "seed1").mkdir()  # an unfinished run
    (tmp_path / "moelora" / "seed1" / "scores_dev.json").write_text(json.dumps({"KUAKE-QIC": 0.9, "average": 0.9}))
    (tmp_path / "no_gate" / "seed0").mkdir(parents=True)
    (tmp_path / "no_gate" / "seed0" / paper_table.DONE).write_text(json.dumps({"splits": ["test"]}))
    (tmp_path / "cgc_lora" / "seed_old").mkdir()
    paper_table.main(["--config", "med8", "--out", str(tmp_path), "--quick"])  # one seed of three rows: all done
    out = capsys.readouterr().out
    assert out.count("done, skipped") == 3
    table = json.loads((tmp_path / "table.json").read_text())
    assert list(table) == ["In-context", "LoRA Full", "MOE-LoRA", "CGC-LoRA"]
    assert table["CGC-LoRA"]["average"] == [0.30, 0.32, 0.31] and table["MOE-LoRA"]["average"] == [0.26]
    paired = {line.split(" | ")[0][2:]: line.split(" | ")[1] for line in out.splitlines() if "ahead" in line
              or "within" in line or "no spread" in line}
    assert paired == {"In-context": "0", "LoRA Full": "0,1,2", "MOE-LoRA": "0"}
    assert json.loads(out.strip().splitlines()[-1])["cgc_lora_minus"]["MOE-LoRA"] == pytest.approx(4.0)


def test_row_overrides_reach_their_row_alone(tmp_path, monkeypatch, capsys):
    """--row-override cgc_lora:train.lr=...: a learning rate per row, on top of --override."""
    import cgc_lora_jax.training.loop as loop

    trained = {}

    def fake_train(cfg, folder):
        trained[folder.parent.name] = (cfg.train.lr, cfg.train.steps, cfg.train.seed)
        folder.mkdir(parents=True)
        return {"step": cfg.train.steps}

    def fake_answer(folder, splits):
        (folder / "scores_dev.json").write_text(json.dumps({"KUAKE-QIC": 0.5, "average": 0.5}))

    monkeypatch.setattr(loop, "train", fake_train)
    monkeypatch.setattr(paper_table, "answer_splits", fake_answer)
    seed = load_config("med8").train.seed
    paper_table.main(["--config", "med8", "--out", str(tmp_path), "--rows", "lora_full,cgc_lora,moelora", "--seeds", "1",
                      "--override", "train.steps=7", "--row-override", "cgc_lora:train.lr=0.003",
                      "--row-override", "moelora:train.lr=0.002", "--row-override", "cgc_lora:train.steps=9"])
    base_lr = load_config("med8").train.lr
    assert trained == {"lora_full": (base_lr, 7, seed), "cgc_lora": (0.003, 9, seed), "moelora": (0.002, 7, seed)}
    assert json.loads((tmp_path / "cgc_lora" / "seed0" / paper_table.DONE).read_text())["row"] == "cgc_lora"
    for bad in ("cgc_lora", "cgc_lora:train.lr", "nosuchrow:train.lr=1"):
        with pytest.raises(SystemExit):
            paper_table.main(["--config", "med8", "--out", str(tmp_path / "x"), "--row-override", bad])
    assert "give ROW:KEY=VALUE" in capsys.readouterr().err


def test_a_preempted_training_run_stops_the_table_cleanly(tmp_path, monkeypatch):
    """SIGTERM during a row's training (a lent machine's time running out): exit 143 with the
    checkpoint kept, no attempt to answer with adapters that were never written."""
    import cgc_lora_jax.training.loop as loop

    monkeypatch.setattr(loop, "train", lambda cfg, folder: {"step": 3, "preempted": True})
    monkeypatch.setattr(paper_table, "answer_splits", lambda folder, splits: pytest.fail("answered a preempted run"))
    with pytest.raises(SystemExit) as stop:
        paper_table.main(["--config", "med8", "--out", str(tmp_path), "--rows", "cgc_lora", "--seeds", "1"])
    assert stop.value.code == 143 and not (tmp_path / "cgc_lora" / "seed0" / paper_table.DONE).exists()


def test_dev_only_skips_test_and_a_later_run_predicts_test_without_training_again(tmp_path, monkeypatch, capsys):
    """--dev-only trains and scores dev; the same command without it later answers test alone for
    those folders (no second training), and a done.json from before --dev-only counts as both."""
    import cgc_lora_jax.training.loop as loop

    trained, answered = [], []

    def fake_train(cfg, folder):
        trained.append(folder.parent.name)
        folder.mkdir(parents=True, exist_ok=True)
        return {"step": cfg.train.steps}

    def fake_answer(folder, splits):
        answered.append((folder.parent.name, splits))
        if "dev" in splits:
            (folder / "scores_dev.json").write_text(json.dumps({"KUAKE-QIC": 0.5, "average": 0.5}))

    monkeypatch.setattr(loop, "train", fake_train)
    monkeypatch.setattr(paper_table, "answer_splits", fake_answer)
    old = tmp_path / "moelora" / "seed0"
    old.mkdir(parents=True)
    (old / "scores_dev.json").write_text(json.dumps({"KUAKE-QIC": 0.1, "average": 0.1}))
    (old / paper_table.DONE).write_text(json.dumps({"row": "moelora", "seed": 0, "seconds": 5.0}))
    args = ["--config", "med8", "--out", str(tmp_path), "--rows", "lora_full,cgc_lora,moelora", "--seeds", "1"]
    paper_table.main([*args, "--dev-only"])
    assert trained == ["lora_full", "cgc_lora"]
    assert answered == [("lora_full", ("dev",)), ("cgc_lora", ("dev",))]
    done = json.loads((tmp_path / "cgc_lora" / "seed0" / paper_table.DONE).read_text())
    assert done["splits"] == ["dev"]
    paper_table.main(args)
    assert trained == ["lora_full", "cgc_lora"]  # not trained again
    assert answered[2:] == [("lora_full", ("test",)), ("cgc_lora", ("test",))]
    after = json.loads((tmp_path / "cgc_lora" / "seed0" / paper_table.DONE).read_text())
    assert after["splits"] == ["dev", "test"] and after["seconds"] >= done["seconds"]
    out = capsys.readouterr().out
    assert out.count("moelora/seed0: done, skipped") == 2
    paper_table.main(args)
    assert len(answered) == 4 and "cgc_lora/seed0: done, skipped" in capsys.readouterr().out


@pytest.mark.slow
def test_every_row_end_to_end_on_the_offline_demo(tmp_path, capsys):
    """All eight rows on demo_tiny (2 training steps, 2 dev records per task): each row/seed
    folder has dev scores and test predictions for every test id; a rerun redoes nothing."""
    args = ["--config", "demo_tiny", "--out", str(tmp_path), "--seeds", "2", "--icl-shots", "1",
            "--hub-shots", "2", "--hub-budget", "3"]
    for override in ("data.tasks=CategoryClassification,ColourExtraction,DigitsToChinese", "lora.num_common=3",
                     "train.steps=2", "train.batch_size=6", "train.checkpoint_every=2", "train.eval_every=0",
                     "data.max_eval_per_task=2", "eval.max_new_tokens=4", "mesh.data=1"):
        args += ["--override", override]
    paper_table.main(args)
    test_ids = [json.loads(line)["sample_id"] for line in (tmp_path / "cgc_lora" / "seed0" / "data" / "test.json")
                .read_text().splitlines()]
    assert len(test_ids) == 96
    for row in paper_table.ROWS:
        for seed in ([0, 1] if row in paper_table.MULTI_SEED_ROWS else [0]):
            folder = tmp_path / row / f"seed{seed}"
            assert json.loads((folder / "scores_dev.json").read_text())["average"] >= 0
            predicted = [json.loads(line)["sample_id"] for line in (folder / "predictions_test.jsonl").read_text().splitlines()]
            assert sorted(predicted) == sorted(test_ids)
    first = capsys.readouterr().out
    paper_table.main(args)
    again = capsys.readouterr().out
    assert again.count("done, skipped") == 10 and "| CGC-LoRA | 2 |" in first
    assert json.loads(again.strip().splitlines()[-1])["seconds"] == {}
