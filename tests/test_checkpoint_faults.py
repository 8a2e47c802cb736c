"""Broken checkpoints and runs: each is a named error or a fall-back to the previous good step,
never a traceback from orbax; a failed write (full disk) stops the run and keeps the last good one.

Most cases need no training: checkpoints 4 and 8 of an untrained state are written once, and
each case damages a copy and calls the restore the trainer calls (RunCheckpoints.restore_latest
with this config's abstract state). The cases that hinge on the trainer's order (the saved
config.json kept, the data position checked) and the command line run `train()` / `train.py`.
"""

import contextlib
import os
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from cgc_lora_jax.run import encode, load_base, lora_config, read_data
from cgc_lora_jax.data.batching import BatchIterator
from cgc_lora_jax.training.checkpoint import RunCheckpoints, abstract_like
from cgc_lora_jax.training.checkpoint_checks import (TMP_MARK, UNREADABLE_SUFFIX, CheckpointError,
                                                     CheckpointFallbackWarning, CheckpointLayoutError,
                                                     CheckpointUnreadableError, CheckpointWriteError,
                                                     RunConfigMismatchError)
from cgc_lora_jax.config import load_config
from cgc_lora_jax.params import split_params
from cgc_lora_jax.training.step import TrainState, make_optimizer
from cgc_lora_jax.training.loop import train
from train_runs import FAST, checkpoint_steps, command, environment

RUN = [*FAST, "mesh.data=1", "train.steps=8", "train.checkpoint_every=4"]


class Saved:
    """A workdir (data, task vocabulary, config) with checkpoints 4 and 8 of an untrained state,
    saved at the data positions of steps 4 and 8, as the trainer saves them."""

    def __init__(self, workdir: Path):
        self.workdir, self.cfg = workdir, load_config("demo_tiny", RUN)
        splits, vocab = read_data(self.cfg.data, workdir, seed=self.cfg.train.seed)
        vocab.save(workdir / "task_vocab.json")
        (workdir / "config.json").write_text("{}\n")
        self.base = load_base(self.cfg.model, lora=lora_config(self.cfg.lora, len(vocab.tasks)))
        self.state = TrainState.create(split_params(self.base.params)[1], make_optimizer(self.cfg.train)[0], 0)
        batches = BatchIterator(encode(self.cfg.data, splits.datasets["train"], self.base, vocab),
                                batch_size=self.cfg.train.batch_size, seed=self.cfg.train.seed)
        ckpt = self.checkpoints(workdir)
        for step in (4, 8):
            for _ in range(4):
                next(batches)
            ckpt.save(step, self.state, {"config": self.cfg.to_dict(), "data": batches.state()})
        ckpt.wait()
        ckpt.close()

    def checkpoints(self, workdir: Path) -> RunCheckpoints:
        return RunCheckpoints(workdir, self.cfg.train.keep_checkpoints, self.base.info)

    def restore(self, workdir: Path, config: dict | None = None):
        """What the trainer does on start: (state, meta) of the step it resumes from."""
        ckpt = self.checkpoints(workdir)
        try:
            return ckpt.restore_latest(abstract_like(self.state), config or self.cfg.to_dict())
        finally:
            ckpt.close()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Saved:
    return Saved(tmp_path_factory.mktemp("saved"))


@pytest.fixture
def run(saved, tmp_path) -> Path:
    shutil.copytree(saved.workdir, tmp_path, dirs_exist_ok=True)
    return tmp_path


def truncate_largest_array_file(step_dir: Path) -> Path:
    largest = max((p for p in (step_dir / "state").rglob("d/*") if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(largest, largest.stat().st_size // 2)
    return largest


def remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


DAMAGE = {
    "truncated array file": truncate_largest_array_file,
    "no state item": lambda step: remove(step / "state"),
    "no meta item": lambda step: remove(step / "meta"),
    "no array metadata": lambda step: remove(step / "state" / "_METADATA"),
    "no ocdbt manifest": lambda step: remove(step / "state" / "manifest.ocdbt"),
    "meta not json": lambda step: (step / "meta" / "metadata").write_text("{not json"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_step_falls_back_to_the_previous_one_with_a_warning(saved, run, damage):
    DAMAGE[damage](run / "checkpoints" / "8")
    files_before = sorted(p.relative_to(run / "checkpoints" / "8") for p in (run / "checkpoints" / "8").rglob("*"))
    with pytest.warns(CheckpointFallbackWarning, match=r"checkpoints/8 cannot be read \(.+\); it is moved to "
                                                       r"8\.unreadable and the run resumes from step 4"):
        _, meta = saved.restore(run)
    assert meta["step"] == 4
    assert checkpoint_steps(run) == [4]
    kept = run / "checkpoints" / f"8{UNREADABLE_SUFFIX}"
    assert sorted(p.relative_to(kept) for p in kept.rglob("*")) == files_before, "its files are kept, not deleted"


def test_no_readable_step_is_a_named_error_that_renames_nothing(saved, run):
    for step in ("4", "8"):
        truncate_largest_array_file(run / "checkpoints" / step)
    with pytest.raises(CheckpointUnreadableError, match=r"no checkpoint in .*checkpoints can be read: step 8: .*"
                                                        r"OUT_OF_RANGE.*; step 4: .*Move the folder aside"):
        saved.restore(run)
    assert checkpoint_steps(run) == [4, 8]


def test_an_adapter_shape_that_no_longer_matches_is_a_named_error(saved, run):
    with pytest.raises(RunConfigMismatchError, match=r"checkpoints/8 was saved with other settings than this run's.*"
                                                     r"lora\.common_rank = 4 there, 2 now; train\.lr = 0\.02 there, 0\.5 now"):
        saved.restore(run, load_config("demo_tiny", [*RUN, "lora.common_rank=2", "train.lr=0.5"]).to_dict())
    # How long to train and how often to log or save may change on resume.
    later = load_config("demo_tiny", [*RUN, "train.steps=80", "train.log_every=4", "train.keep_checkpoints=5"])
    assert saved.restore(run, later.to_dict())[1]["step"] == 8


def test_a_checkpoint_of_another_adapter_layout_is_a_named_error(saved, run):
    """Step 8's state replaced by a state of 2 common experts, its meta (this run's config) kept:
    what copying checkpoints between runs of different CGC-LoRA layouts produces."""
    cfg = load_config("demo_tiny", [*RUN, "lora.num_common=2"])
    base = load_base(cfg.model, lora=lora_config(cfg.lora, 3))
    other = RunCheckpoints(run / "other", 1, base.info)
    other.save(8, TrainState.create(split_params(base.params)[1], make_optimizer(cfg.train)[0], 0), {})
    other.close()
    shutil.rmtree(run / "checkpoints" / "8" / "state")
    shutil.copytree(run / "other" / "checkpoints" / "8" / "state", run / "checkpoints" / "8" / "state")
    with pytest.raises(CheckpointLayoutError, match=r"checkpoints/8 holds another adapter layout than this config "
                                                    r"builds: adapters/task_gate/common: shape \(16, 2\) in the "
                                                    r"checkpoint, \(16, 4\) in this config"):
        saved.restore(run)


def test_a_refused_resume_names_the_edit_and_keeps_the_run_as_it_was(saved, run):
    """The trainer's order: checks first, then config.json and metrics.jsonl are touched."""
    (run / "metrics.jsonl").write_text('{"step": 9, "loss": 1.0}\n')
    with pytest.raises(RunConfigMismatchError, match=r"train\.batch_size = 8 there, 4 now"):
        train(load_config("demo_tiny", [*RUN, "train.batch_size=4"]), run)
    assert (run / "config.json").read_text() == "{}\n" and "step\": 9" in (run / "metrics.jsonl").read_text()
    # Training data that changed under the checkpoint: its saved position no longer fits.
    train_file = run / "data" / "train.json"
    train_file.write_text("".join(train_file.read_text().splitlines(keepends=True)[:-8]))
    with pytest.raises(RunConfigMismatchError, match=r"checkpoints/8 was saved at a position in other training "
                                                     r"data than .*train.json holds now"):
        train(load_config("demo_tiny", RUN), run)
    assert (run / "config.json").read_text() == "{}\n"


@contextlib.contextmanager
def files_limited_to(size: int):
    """Every write past `size` bytes in a file fails (EFBIG), in this process, as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_failed_checkpoint_write_is_a_named_error_and_keeps_the_last_good_one(saved, run):
    """Files limited to 20 kB: larger than the JSON files, smaller than the state's metadata (29 kB)
    and than its largest array (a [28, 512] expert, 57 kB), however TensorStore groups them."""
    shutil.rmtree(run / "checkpoints" / "8")
    ckpt = saved.checkpoints(run)
    with files_limited_to(20_000), pytest.raises(CheckpointWriteError) as failed:
        ckpt.save(8, saved.state, {"config": saved.cfg.to_dict(), "data": {}})
        ckpt.wait()
    message = str(failed.value)
    assert message.startswith(f"writing checkpoint {run / 'checkpoints' / '8'} failed (")
    assert "File too large" in message and f"The last good checkpoint is {run / 'checkpoints' / '4'}" in message
    ckpt.close()
    assert checkpoint_steps(run) == [4] and list((run / "checkpoints").glob(f"8{TMP_MARK}*"))
    with pytest.warns(CheckpointFallbackWarning, match="unfinished checkpoint write"):
        assert saved.restore(run)[1]["step"] == 4  # the last good one is intact
    assert isinstance(failed.value, CheckpointError)  # train.py prints these as one line, no traceback


def _small_files(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_train_py_stops_on_a_failed_write_with_one_line(saved, run):
    """The command line: a run whose checkpoint 8 cannot be written (files limited to 200 kB)
    prints one error line naming the failed and the last good checkpoint, and exits 1."""
    shutil.rmtree(run / "checkpoints" / "8")
    env = {k: v for k, v in environment(8).items() if k != "JAX_COMPILATION_CACHE_DIR"}
    done = subprocess.run(command(run, RUN), env=env, preexec_fn=_small_files(200_000), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 1, done.stderr[-3000:]
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith(f"train.py: error: writing checkpoint {run / 'checkpoints' / '8'} failed (")
    assert "File too large" in error and f"The last good checkpoint is {run / 'checkpoints' / '4'}" in error
    # Known leftover: TensorStore callbacks of the cancelled writes sometimes print "Event loop is
    # closed" tracebacks from asyncio (orbax's loop has closed); nothing else may print one.
    tracebacks = done.stderr.split("Traceback (most recent call last):")[1:]
    assert all("RuntimeError: Event loop is closed" in t.split("Traceback")[0] for t in tracebacks), done.stderr
    assert checkpoint_steps(run) == [4] and not (run / "adapters").exists()


def _can_mount_tmpfs(path: Path) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)],
                                           capture_output=True).returncode:
        return False
    subprocess.run(["umount", str(path)], check=True)
    return True


@pytest.mark.slow
def test_a_full_tmpfs_stops_the_run_and_keeps_the_last_good_one(saved, tmp_path):
    """A real full disk: the run in a 2.5 MB tmpfs (root only; skipped otherwise)."""
    disk = tmp_path / "disk"
    if not _can_mount_tmpfs(disk):
        pytest.skip("mounting a tmpfs needs root (and a kernel that allows it here)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2500k", "tmpfs", str(disk)], check=True)
    try:
        workdir = disk / "run"
        workdir.mkdir()
        for name in ("data", "task_vocab.json"):
            (shutil.copytree if name == "data" else shutil.copy)(saved.workdir / name, workdir / name)
        done = subprocess.run(command(workdir, [*RUN, "train.keep_checkpoints=5"]), env=environment(8),
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 1, done.stderr[-3000:]
        assert "No space left on device" in done.stderr.strip().splitlines()[-1]
        assert "Traceback" not in done.stderr
        good = checkpoint_steps(workdir)
        assert good, "the first checkpoint fitted"
        assert f"The last good checkpoint is {workdir / 'checkpoints' / str(good[-1])}" in done.stderr
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
