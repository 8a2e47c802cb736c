"""Helpers shared by the bench scripts: interleaved timing and a child process's peak RSS.

Interleaving: every timed round runs each variant once, in a fixed order, and a variant's figure
is the median of its rounds. Load from other processes then slows all variants alike instead of
whichever happened to run during a busy spell, so the ratios stay meaningful on a shared machine.

    medians = interleaved_medians({"a": run_a, "b": run_b}, rounds=5)   # seconds per call
    rc, stdout, peak_bytes = run_child_peak_rss([sys.executable, "script.py", "--child"])
"""

from __future__ import annotations

import resource
import subprocess
import time
from typing import Any, Callable

import numpy as np


def interleaved_times(
    fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1, wait: Callable[[Any], Any] = lambda r: r
) -> dict[str, list[float]]:
    """Wall seconds of `rounds` calls of every fn, round by round, after `warmup` untimed calls.

    `wait(result)` blocks until the call's work is done (e.g. jax.block_until_ready): JAX returns
    before the computation ends, so the clock must stop on the result, not on the call.
    """
    for _ in range(warmup):
        for fn in fns.values():
            wait(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            wait(fn())
            times[name].append(time.perf_counter() - start)
    return times


def interleaved_medians(
    fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1, wait: Callable[[Any], Any] = lambda r: r
) -> dict[str, float]:
    """Median seconds per call of each fn (see `interleaved_times`)."""
    return {name: float(np.median(t)) for name, t in interleaved_times(fns, rounds, warmup, wait).items()}


def run_child_peak_rss(cmd: list[str], env: dict | None = None, timeout_s: float | None = None) -> tuple[int, str, int]:
    """Run `cmd` (environment `env`, default ours) to completion: (return code, its stdout, its
    peak resident set size in bytes).

    The peak is `getrusage(RUSAGE_CHILDREN).ru_maxrss` after the child is reaped: the largest
    RSS any reaped child of this process ever had (kilobytes on Linux). Call it before this
    process starts other large children, or the figure may be theirs.
    """
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, timeout=timeout_s)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return proc.returncode, proc.stdout, peak_kib * 1024


def matmul_calls(m: int, k: int, n: int) -> dict[str, Callable[[], Any]]:
    """Zero-argument jit matmuls [m, k] @ [k, n]: this CPU's ceiling for the step's matmuls.

    "f32": float32 in and out; "bf16": bfloat16 in, float32 accumulation and output (XLA:CPU's
    fast bf16 kernel; a bf16-out dot without preferred_element_type takes a slow path).
    """
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (k, n), jnp.float32) * k**-0.5
    f32 = jax.jit(lambda a, b: a @ b)
    bf16 = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    return {"f32": lambda: f32(x, w), "bf16": lambda: bf16(x16, w16)}
