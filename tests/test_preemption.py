"""Preemption: SIGKILL at any moment (in the middle of a checkpoint write too) and SIGTERM.

Every resumed run must log exactly the uninterrupted run's per-step losses (one device, the same
program: bit-identical), and a checkpoint whose write was cut is never restored: the previous
complete one is, with a warning. The slow test kills one run 10 times at seeded random moments.
"""

import re
import signal
import time

import numpy as np
import pytest

from cgc_lora_jax.training.checkpoint_checks import TMP_MARK
from cgc_lora_jax.training.preemption import EXIT_STATUS
from train_runs import FAST, checkpoint_steps, losses, run_killed, run_one, start

ONE_DEVICE = [*FAST, "mesh.data=1", "train.checkpoint_every=4"]
STEPS = 12


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    done = run_one(workdir, [*ONE_DEVICE, f"train.steps={STEPS}"])
    assert done.returncode == 0, done.stderr[-3000:]
    return losses(workdir)


def test_kill_during_a_checkpoint_write_resumes_from_the_previous_one(reference, tmp_path):
    overrides = [*ONE_DEVICE, f"train.steps={STEPS}"]
    killed = run_killed(tmp_path, overrides, step=8, phase="during")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert checkpoint_steps(tmp_path) == [4], "checkpoint 8 was still being written when the run died"
    assert list((tmp_path / "checkpoints").glob(f"8{TMP_MARK}*")), "the cut write left its temporary folder"

    resumed = run_one(tmp_path, overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(f"CheckpointFallbackWarning: .*/8{TMP_MARK}.*: an unfinished checkpoint write", resumed.stderr)
    assert f"resumed from {tmp_path / 'checkpoints' / '4'}" in resumed.stdout + resumed.stderr
    assert losses(tmp_path) == reference  # every step, exactly
    assert checkpoint_steps(tmp_path) == [4, 8, 12]
    assert not list((tmp_path / "checkpoints").glob(f"*{TMP_MARK}*")), "the unfinished write is cleaned up"


def wait_for(condition, proc, what, timeout=600):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.01)


def last_step(workdir) -> int:
    return max(losses(workdir), default=0) if (workdir / "metrics.jsonl").exists() else 0


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(reference, tmp_path):
    overrides = [*ONE_DEVICE, f"train.steps={STEPS}"]
    log = tmp_path.with_suffix(".log")
    proc = start(tmp_path, overrides, log=log)
    wait_for(lambda: last_step(tmp_path) >= 2, proc, "step 2")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == EXIT_STATUS
    output = log.read_text()
    assert "Traceback" not in output
    stopped = last_step(tmp_path)
    assert 2 <= stopped < STEPS and checkpoint_steps(tmp_path)[-1] == stopped, "the step it stopped at is saved"
    assert f"SIGTERM received: saved checkpoint {tmp_path / 'checkpoints' / str(stopped)}" in output
    assert f"stopped by SIGTERM after step {stopped}" in output

    resumed = run_one(tmp_path, overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(tmp_path) == reference


def cut_writes(workdir):
    """Steps whose checkpoint write was cut (their temporary folders)."""
    folder = workdir / "checkpoints"
    return {int(p.name.split(".")[0]) for p in folder.glob(f"*{TMP_MARK}*")} if folder.is_dir() else set()


@pytest.mark.slow
def test_ten_random_kills_resume_to_the_uninterrupted_losses(tmp_path):
    """One run of 40 steps (a checkpoint every 3), SIGKILLed 10 times at seeded random moments
    and restarted after each: while starting up, after a random step, or while a checkpoint is
    being written (at least 3 of those, seen by its temporary folder appearing)."""
    overrides = [*FAST, "mesh.data=1", "train.steps=40", "train.checkpoint_every=3"]
    assert run_one(tmp_path / "uninterrupted", overrides).returncode == 0
    reference = losses(tmp_path / "uninterrupted")
    rng = np.random.default_rng(13)
    workdir = tmp_path / "run"
    kinds = ["write"] * 3 + list(rng.choice(["startup", "step", "write"], size=7))
    rng.shuffle(kinds)
    done = lambda: last_step(workdir)
    cut, hits = set(), 0
    for kill, kind in enumerate([*kinds, "none"]):
        log = tmp_path / f"run{kill}.log"
        proc = start(workdir, overrides, log=log)
        if kind == "startup":
            time.sleep(rng.uniform(0.5, 8.0))
        elif kind == "step":
            target = done() + int(rng.integers(1, 6))
            wait_for(lambda: done() >= target, proc, f"step {target}")
            time.sleep(rng.uniform(0.0, 0.2))
        elif kind == "write":
            wait_for(lambda: cut_writes(workdir) - cut, proc, "a checkpoint write")
        if kind != "none":
            proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=600) == (-signal.SIGKILL if kind != "none" else 0), log.read_text()[-3000:]
        output = log.read_text()
        # A cut write of the previous run is never restored: this run warned and resumed before it.
        if cut and "resumed from" in output:
            assert "unfinished checkpoint write" in output, output[-3000:]
            restored = int(output.split("resumed from ")[1].split()[0].rsplit("/", 1)[1])
            assert restored < min(cut), (restored, cut)
        # Every step logged so far is the uninterrupted run's, exactly.
        assert all(reference[s] == v for s, v in losses(workdir).items()), f"kill {kill} ({kind})"
        if kind != "none":
            assert done() < 40, f"kill {kill} ({kind}) came after the run had finished"
        cut = cut_writes(workdir)
        hits += bool(cut) and kind != "none"
    assert hits >= 3, f"only {hits} of the kills cut a checkpoint write"
    assert losses(workdir) == reference
