"""Shared by the reliability tests: the demo run as separate `train.py` processes.

A run is launched exactly as a user launches it (the entry point, dotted overrides, environment
variables for the cluster), so what is tested is what ships. One width (data.pad_multiple=96 =
max_source_len + max_target_len) makes every batch one shape: one compilation per process.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.batch_size=8", "train.lr=2e-2", "train.log_every=1", "train.eval_every=0",
        "train.warmup_steps=2", "data.pad_multiple=96"]
MESH_8 = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
# The XLA CPU client splits its threads among the devices it has, which changes how a reduction
# is cut up: a one-device run in a process with 8 devices (the tests' own, see conftest.py) is
# bit-identical only to another such run, so subprocesses get 8 by default.
DEVICES = 8


def losses(workdir: Path) -> dict[int, float]:
    """step -> training loss, from the run's metrics.jsonl."""
    path = Path(workdir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def checkpoint_steps(workdir: Path) -> list[int]:
    folder = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def command(workdir: Path, overrides) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--config", "demo_tiny", "--workdir", str(workdir), "--no-eval",
            *(f"--config.{o}" for o in overrides)]


def _compilation_cache() -> str:
    """One XLA compilation cache for this session's runs: a restarted run reuses the program its
    predecessor compiled (the same executable, so the same numbers) instead of compiling again."""
    global _CACHE
    if _CACHE is None:
        _CACHE = tempfile.mkdtemp(prefix="cgc-lora-jax-xla-cache-")
        atexit.register(shutil.rmtree, _CACHE, True)
    return _CACHE


_CACHE = None


def environment(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "CGC_LORA_"))}
    return {**env, "PYTHONPATH": str(ROOT), "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "PYTHONUNBUFFERED": "1", "JAX_COMPILATION_CACHE_DIR": _compilation_cache(), **extra}


def start(workdir: Path, overrides, devices: int = DEVICES, log: Path | None = None, **extra_env) -> subprocess.Popen:
    """One `train.py` process; its stdout and stderr go to `log` (default WORKDIR.log)."""
    log = Path(log or f"{workdir}.log")
    with open(log, "ab") as out:
        return subprocess.Popen(command(workdir, overrides), env=environment(devices, **extra_env),
                                stdout=out, stderr=subprocess.STDOUT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_hosts(workdir: Path, overrides, hosts: int = 2, devices_per_host: int = 4, timeout: float = 900) -> None:
    """`hosts` processes of one run on this machine, joined through jax.distributed on localhost
    (JAX's CPU collectives, gloo); fails with every host's log when one exits non-zero."""
    cluster = {"JAX_COORDINATOR_ADDRESS": f"localhost:{free_port()}", "JAX_NUM_PROCESSES": str(hosts)}
    logs = [Path(f"{workdir}.host{i}.log") for i in range(hosts)]
    procs = [start(workdir, overrides, devices_per_host, log, JAX_PROCESS_ID=str(i), **cluster)
             for i, log in enumerate(logs)]
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(codes):
        tails = "\n".join(f"--- host {i} (exit {c}):\n{log.read_text()[-3000:]}" for i, (c, log) in
                          enumerate(zip(codes, logs)))
        raise AssertionError(f"a host failed:\n{tails}")


def run_one(workdir: Path, overrides, devices: int = DEVICES, timeout: float = 900) -> subprocess.CompletedProcess:
    """One `train.py` process to its end; its output is returned (not raised on failure)."""
    return subprocess.run(command(workdir, overrides), env=environment(devices), capture_output=True,
                          text=True, timeout=timeout)


# `python -c KILLER train.py ARGS`: train.py, killed by SIGKILL from inside at a chosen checkpoint:
# KILL_AT_STEP=N, KILL_PHASE=after (once step N is fully written) or during (as soon as its
# write has started: orbax is still writing it in the background).
KILLER = """
import os, signal, sys
from cgc_lora_jax.training import checkpoint
import train
at, phase = int(os.environ["KILL_AT_STEP"]), os.environ["KILL_PHASE"]
save = checkpoint.RunCheckpoints.save
def save_then_die(self, step, state, meta):
    save(self, step, state, meta)
    if step == at:
        if phase == "after":
            self.wait()
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.RunCheckpoints.save = save_then_die
sys.exit(train.main(sys.argv[1:]))
"""


def run_killed(workdir: Path, overrides, step: int, phase: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """A `train.py` run SIGKILLed at checkpoint `step` (phase "after" or "during" its write)."""
    cmd = [sys.executable, "-c", KILLER, *command(workdir, overrides)[2:]]
    return subprocess.run(cmd, env=environment(DEVICES, KILL_AT_STEP=str(step), KILL_PHASE=phase), capture_output=True,
                          text=True, timeout=timeout)
