"""Two-operand einsums in the compute dtype with float32 accumulation, forward and backward.

For operands a, b in the compute dtype (bfloat16 on a CPU with bf16 matmuls, or float32),

    out = einsum("A,B->C", a, b)          accumulated in float32, returned in `out_dtype`
    da  = einsum("C,B->A", g, b)          g = the output cotangent cast to the compute dtype
    db  = einsum("C,A->B", g, a)          both accumulated in float32, returned in a's / b's dtype

which is what mixed-precision training does with every matmul's backward. Autodiff of a plain
`jnp.einsum(..., preferred_element_type=float32)` differs: it hands the backward a float32
cotangent, and XLA:CPU then widens the bfloat16 operand to float32 and runs both backward matmuls
in float32 (half the bf16 rate, twice the memory traffic). Attention is where this costs: its
scores stay float32 for the softmax, so the four backward matmuls of q k^T and p v ran in float32
(about a third of a SmolLM2-135M bf16 training step, bench/train_step.py). With float32 operands
nothing changes: g stays float32, and the gradients are autodiff's.

Every index of an operand must appear in the other operand or the output (no index summed inside
one operand), so that each gradient is itself one einsum.

    scores = accum_einsum("btgrd,bsgd->bgrts", q, k)                  # float32 scores
    out = accum_einsum("bgrts,bsgd->btgrd", probs, v, out_dtype=q.dtype)
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


@functools.lru_cache(maxsize=None)
def _parse(spec: str) -> tuple[str, str, str]:
    match = re.fullmatch(r"([a-zA-Z]*),([a-zA-Z]*)->([a-zA-Z]*)", spec.replace(" ", ""))
    if match is None:
        raise ValueError(f"accum_einsum spec {spec!r}: need the explicit form 'ab,bc->ac' (no '...')")
    a, b, out = match.groups()
    for name, own, others in (("first", a, b + out), ("second", b, a + out)):
        lonely = sorted(set(own) - set(others))
        if lonely:
            raise ValueError(f"accum_einsum spec {spec!r}: index {lonely} of the {name} operand appears "
                             "nowhere else; sum it out before the einsum")
    for name, axes in (("first operand", a), ("second operand", b), ("output", out)):
        repeated = sorted(c for c in set(axes) if axes.count(c) > 1)
        if repeated:
            raise ValueError(f"accum_einsum spec {spec!r}: index {repeated} repeats in the {name}")
    stray = sorted(set(out) - set(a + b))
    if stray:
        raise ValueError(f"accum_einsum spec {spec!r}: output index {stray} is in neither operand")
    return a, b, out


@functools.lru_cache(maxsize=None)
def _dot_plan(a: str, b: str, out: str):
    """(swap, lax.dot_general dimension numbers, transpose or None) for einsum "a,b->out".

    dot_general's result axes are (batch, first operand's free, second operand's free); the
    operands go in the order that already gives `out`'s axis order when one does, as jnp.einsum
    orders them (a dot then a transpose of its result ran the SmolLM2 step ~20% slower).
    """
    plans = []
    for swap, (x, y) in enumerate(((a, b), (b, a))):
        batch = [c for c in x if c in y and c in out]
        summed = [c for c in x if c in y and c not in out]
        dims = ((tuple(x.index(c) for c in summed), tuple(y.index(c) for c in summed)),
                (tuple(x.index(c) for c in batch), tuple(y.index(c) for c in batch)))
        natural = "".join(batch) + "".join(c for c in x if c not in y) + "".join(c for c in y if c not in x)
        perm = tuple(natural.index(c) for c in out)
        plans.append((bool(swap), dims, None if perm == tuple(range(len(perm))) else perm))
    return plans[1] if plans[0][2] is not None and plans[1][2] is None else plans[0]


def _einsum_f32(a_axes: str, b_axes: str, out_axes: str, a: Array, b: Array) -> Array:
    """einsum(f"{a_axes},{b_axes}->{out_axes}", a, b) accumulated and returned in float32.

    A contraction whose result needs no transpose in one operand order (every dense layer's
    forward and backward) is one dot_general, the one jnp.einsum makes, at a fraction of its
    tracing cost (paid at every dense layer of an unrolled model); the others (attention's) go
    through jnp.einsum, whose choice of operand order and transpose XLA:CPU runs fastest.
    """
    swap, dims, perm = _dot_plan(a_axes, b_axes, out_axes)
    if perm is not None:
        return jnp.einsum(f"{a_axes},{b_axes}->{out_axes}", a, b, preferred_element_type=jnp.float32)
    return lax.dot_general(*((b, a) if swap else (a, b)), dims, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _accum_einsum(spec: str, a: Array, b: Array, out_dtype) -> Array:
    y = _einsum_f32(*_parse(spec), a, b)
    return y if y.dtype == out_dtype else y.astype(out_dtype)


def _fwd(spec, a, b, out_dtype):
    return _accum_einsum(spec, a, b, out_dtype), (a, b)


def _bwd(spec, out_dtype, residuals, g):
    a, b = residuals
    a_axes, b_axes, out_axes = _parse(spec)
    g = g if g.dtype == a.dtype else g.astype(a.dtype)
    da = _einsum_f32(out_axes, b_axes, a_axes, g, b)
    db = _einsum_f32(out_axes, a_axes, b_axes, g, a)
    return (da if da.dtype == a.dtype else da.astype(a.dtype)), (db if db.dtype == b.dtype else db.astype(b.dtype))


_accum_einsum.defvjp(_fwd, _bwd)


def accum_einsum(spec: str, a: Array, b: Array, out_dtype=jnp.float32) -> Array:
    """einsum(spec, a, b) accumulated in float32, cast to `out_dtype`; see the module docstring
    for its backward. a and b must share one dtype (the compute dtype)."""
    _parse(spec)
    if a.dtype != b.dtype:
        raise ValueError(f"accum_einsum {spec!r}: operands in {a.dtype} and {b.dtype}; cast both to the "
                         "compute dtype first")
    return _accum_einsum(spec, a, b, jnp.dtype(out_dtype))


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 natively (x86: avx512_bf16 or amx_bf16; Arm: bf16).

    Without it, XLA:CPU emulates bf16 matmuls, and they run slower than float32 ones (an AVX2-only
    EPYC: 85 vs 114 GFLOP/s for 1024^3), so bfloat16 saves memory there but no time."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_dtype(name: str, platform: str | None = None, cpuinfo: str | None = None) -> str:
    """A config's model dtype as a concrete name: "float32" and "bfloat16" stay; "auto" is
    bfloat16 on an accelerator (GPU, TPU) or a CPU with native bf16 matmuls, float32 on other
    CPUs, where it is the faster of the two."""
    if name != "auto":
        return name
    platform = platform or jax.default_backend()
    return "bfloat16" if platform != "cpu" or cpu_has_native_bf16(cpuinfo) else "float32"


def describe_dtype(name: str) -> str:
    """`name` for a log line: "bfloat16", or "auto: float32 (this CPU has no native bf16 matmuls)"."""
    resolved = resolve_dtype(name)
    if name != "auto":
        return name
    why = "an accelerator" if jax.default_backend() != "cpu" else (
        "this CPU multiplies bf16 natively" if resolved == "bfloat16" else "this CPU has no native bf16 matmuls")
    return f"auto: {resolved} ({why})"
