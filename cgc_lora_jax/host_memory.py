"""Keep freed host memory in the process for reuse (glibc), so that XLA:CPU's per-call buffers do
not fault in fresh pages on every training step.

XLA:CPU allocates each execution's temporaries with posix_memalign from a worker thread: for a
SmolLM2-135M training step of 8 x 320 tokens one block of 6.5 GB. glibc serves a block that large
from a fresh mmap (always, from a thread's own arena) and unmaps it when it is freed, so every
step faults 1.6 million zeroed pages back in: 7-8 s of kernel time per step on 2 cores, a third of
the step's wall time (bench/train_step.py --parts host-memory). `reuse_freed_memory()` makes every
thread allocate from the main heap (one arena), without mmap, and never trims the heap: the
second step reuses the first step's pages. The cost: the process keeps its peak heap until it
exits, and freed holes that small allocations split stay resident: with remat and XLA's
low-memory schedule the 16 x 320 bf16 step peaked at 2.51 GiB under reuse (1.77 GiB with glibc's
defaults, measured on another machine), so train.py leaves glibc's defaults alone when
model.remat asks for the least memory. Without remat it peaked at 6.84 GiB (8.18 there).

Call it before JAX starts its CPU backend (before the first computation or `jax.devices()`): the
worker threads pick their arena when they first allocate. The command-line entry points call it;
a library user opts in. Elsewhere than glibc, or with CGC_LORA_JAX_MALLOC=default in the
environment (to keep glibc's defaults), it does nothing and returns False.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

_done = False


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None  # musl and others: no glibc arenas to configure
    return libc


def reuse_freed_memory() -> bool:
    """One heap, no mmap'd blocks, no trimming (glibc's mallopt); True when applied. Idempotent."""
    global _done
    if _done:
        return True
    if os.environ.get("CGC_LORA_JAX_MALLOC", "") == "default":
        return False
    libc = _libc()
    if libc is None:
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))  # -1: never trim (mallopt(3))
    _done = all(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1 for param, value in settings)
    return _done
