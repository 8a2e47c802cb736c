"""host_memory.reuse_freed_memory: a repeated XLA:CPU call stops faulting in fresh pages."""

import json
import subprocess
import sys

import pytest

from cgc_lora_jax.host_memory import _libc

CHILD = """
import json, resource, sys
from cgc_lora_jax.host_memory import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "reuse" else False
again = reuse_freed_memory() if sys.argv[1] == "reuse" else False
import jax, jax.numpy as jnp
f = jax.jit(lambda x: (jnp.sin(x) @ jnp.cos(x).T).sum())
x = jnp.ones((3072, 3072), jnp.float32)
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(f(x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "again": again, "faults": faults}))
"""


def child(mode: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True,
                         env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", **env}).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(_libc() is None, reason="needs glibc (mallopt)")
def test_a_repeated_call_reuses_its_pages():
    buffer = 3072 * 3072 * 4 // 4096  # one 36 MiB operand, in 4 KiB pages
    plain, reused = child("plain"), child("reuse")
    assert not plain["applied"] and reused["applied"] and reused["again"]  # a second call is harmless
    # glibc maps and unmaps each large temporary per call (the operands and the dot's own buffers):
    # the third call faults all of them in again (about 900k pages here) ...
    assert plain["faults"][2] > 4 * buffer, plain
    # ... and from one heap that is never unmapped nor trimmed the pages are reused (0 here, or
    # one operand's 9216 where the heap grew around a small allocation)
    assert reused["faults"][2] <= buffer + 64 and reused["faults"][2] < plain["faults"][2] / 20, (reused, plain)


def test_elsewhere_than_glibc_it_does_nothing(monkeypatch):
    """Run in a child above, never here: the setting would stay for the rest of the test process."""
    import cgc_lora_jax.host_memory as host_memory

    monkeypatch.setattr(host_memory, "_libc", lambda: None)
    monkeypatch.setattr(host_memory, "_done", False)
    assert host_memory.reuse_freed_memory() is False


def test_the_environment_can_keep_glibcs_defaults():
    kept = child("reuse", CGC_LORA_JAX_MALLOC="default")
    assert not kept["applied"] and kept["faults"][2] > 4 * 3072 * 3072 * 4 // 4096, kept
