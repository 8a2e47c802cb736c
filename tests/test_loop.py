"""Training runs on the built-in demo: learning, sharding, NaN stop, outputs (kill and resume:
test_preemption.py)."""

import json
from pathlib import Path

import numpy as np
import pytest

from cgc_lora_jax.run import BaseMismatchError
from cgc_lora_jax.config import load_config
from cgc_lora_jax.training.loop import NonFiniteLossError, train

# A few-second demo: small batches, every step logged, no validation unless asked.
TINY = ["train.batch_size=8", "train.steps=8", "train.lr=2e-2", "train.log_every=1", "train.eval_every=0",
        "train.checkpoint_every=4", "train.warmup_steps=2", "data.pad_multiple=32"]


def tiny_config(*overrides):
    return load_config("demo_tiny", [*TINY, *overrides])


def losses(workdir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("uninterrupted")
    train(tiny_config("mesh.data=1"), workdir)
    return workdir


def test_run_writes_its_outputs_and_learns(uninterrupted):
    run = losses(uninterrupted)
    assert sorted(run) == list(range(1, 9))
    assert run[8] < run[1] - 0.3, run  # 8 steps at lr 2e-2 already move the loss
    for name in ("config.json", "task_vocab.json", "metrics.jsonl", "adapters/meta.json"):
        assert (uninterrupted / name).is_file(), name
    assert list((uninterrupted / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (uninterrupted / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "8"]
    meta = json.loads((uninterrupted / "adapters/meta.json").read_text())
    assert meta["step"] == 8 and meta["task_vocab"] == json.loads((uninterrupted / "task_vocab.json").read_text())["tasks"]
    assert json.loads((uninterrupted / "config.json").read_text())["train"]["steps"] == 8


def test_sharded_over_8_devices_gives_the_same_losses(tmp_path):
    short = ["train.steps=3", "train.checkpoint_every=3"]
    train(tiny_config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", *short), tmp_path / "sharded")
    train(tiny_config("mesh.data=1", *short), tmp_path / "one_device")
    sharded, single = losses(tmp_path / "sharded"), losses(tmp_path / "one_device")
    np.testing.assert_allclose([sharded[s] for s in (1, 2, 3)], [single[s] for s in (1, 2, 3)], rtol=1e-5)


def test_resume_on_another_base_is_an_error(uninterrupted, tmp_path):
    import shutil

    shutil.copytree(uninterrupted, tmp_path, dirs_exist_ok=True)
    with pytest.raises(BaseMismatchError, match="was trained on base"):
        train(tiny_config("mesh.data=1", "model.dtype=bfloat16", "train.steps=12"), tmp_path)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = tiny_config("mesh.data=1", "train.lr=1e12", "train.warmup_steps=0", "train.grad_clip=0.0",
                      "train.checkpoint_every=1")
    with pytest.raises(NonFiniteLossError, match=r"the loss is (nan|inf).*last good checkpoint is .*checkpoints/(\d)"):
        train(cfg, tmp_path)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and all(np.isfinite(v) for v in losses(tmp_path).values())
    assert max(steps) == max(losses(tmp_path)), "a checkpoint exists for every finite step, none after"


def test_zero_periods_mean_the_last_step_only(tmp_path):
    train(tiny_config("mesh.data=1", "train.steps=3", "train.log_every=0", "train.checkpoint_every=0"), tmp_path)
    assert sorted(losses(tmp_path)) == [3]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]


@pytest.mark.parametrize("override, key", [("train.steps=0", "train.steps"), ("train.log_every=-1", "train.log_every"),
                                           ("train.checkpoint_every=-5", "train.checkpoint_every")])
def test_bad_step_counts_are_named_before_anything_is_written(tmp_path, override, key):
    with pytest.raises(ValueError, match=key):
        train(tiny_config("mesh.data=1", override), tmp_path / "run")
    assert not (tmp_path / "run").exists()
