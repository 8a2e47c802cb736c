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

Array = jax.Array


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
    return a, b, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _accum_einsum(spec: str, a: Array, b: Array, out_dtype) -> Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(out_dtype)


def _fwd(spec, a, b, out_dtype):
    return _accum_einsum(spec, a, b, out_dtype), (a, b)


def _bwd(spec, out_dtype, residuals, g):
    a, b = residuals
    a_axes, b_axes, out_axes = _parse(spec)
    g = g.astype(a.dtype)
    da = jnp.einsum(f"{out_axes},{b_axes}->{a_axes}", g, b, preferred_element_type=jnp.float32)
    db = jnp.einsum(f"{out_axes},{a_axes}->{b_axes}", g, a, preferred_element_type=jnp.float32)
    return da.astype(a.dtype), db.astype(b.dtype)


_accum_einsum.defvjp(_fwd, _bwd)


def accum_einsum(spec: str, a: Array, b: Array, out_dtype=jnp.float32) -> Array:
    """einsum(spec, a, b) accumulated in float32, cast to `out_dtype`; see the module docstring
    for its backward. a and b must share one dtype (the compute dtype)."""
    _parse(spec)
    if a.dtype != b.dtype:
        raise ValueError(f"accum_einsum {spec!r}: operands in {a.dtype} and {b.dtype}; cast both to the "
                         "compute dtype first")
    return _accum_einsum(spec, a, b, jnp.dtype(out_dtype))
