"""accum_einsum: float32-accumulated einsums whose backward stays in the compute dtype."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgc_lora_jax.layers import CGCLoRAConfig, Dense, TaskRouting
from cgc_lora_jax.precision import accum_einsum, cpu_has_native_bf16, resolve_dtype
from models.blocks import grouped_attention

SPECS = {  # the attention matmuls (grouped and plain) and a dense layer
    "btgrd,bsgd->bgrts": ((2, 5, 3, 2, 4), (2, 6, 3, 4)),
    "bgrts,bsgd->btgrd": ((2, 3, 2, 5, 6), (2, 6, 3, 4)),
    "btgd,bgsd->bgts": ((2, 5, 3, 4), (2, 3, 6, 4)),
    "abi,io->abo": ((2, 5, 7), (7, 3)),
}


def operands(spec, dtype, seed=0):
    rng = np.random.default_rng(seed)
    a_shape, b_shape = SPECS[spec]
    return (jnp.asarray(rng.normal(size=a_shape), dtype), jnp.asarray(rng.normal(size=b_shape), dtype))


@pytest.mark.parametrize("spec", list(SPECS))
def test_float32_matches_autodiff_of_einsum(spec):
    a, b = operands(spec, jnp.float32)
    cot = jnp.asarray(np.random.default_rng(1).normal(size=jnp.einsum(spec, a, b).shape), jnp.float32)
    out, vjp = jax.vjp(lambda a, b: accum_einsum(spec, a, b), a, b)
    ref_out, ref_vjp = jax.vjp(lambda a, b: jnp.einsum(spec, a, b, precision="highest"), a, b)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(vjp(cot), ref_vjp(cot)):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", list(SPECS))
def test_bfloat16_backward_rounds_the_cotangent_then_accumulates(spec):
    """bf16 operands: the cotangent is rounded to bf16, the gradients are float64 einsums of the
    rounded values up to the final bf16 rounding of each gradient."""
    a, b = operands(spec, jnp.bfloat16)
    shape = jnp.einsum(spec, a, b).shape
    cot = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
    out, vjp = jax.vjp(lambda a, b: accum_einsum(spec, a, b), a, b)
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    g64 = np.asarray(cot.astype(jnp.bfloat16), np.float64)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, np.einsum(spec, a64, b64), rtol=1e-5, atol=1e-5)
    lhs, rhs, res = re.fullmatch(r"(\w+),(\w+)->(\w+)", spec).groups()
    da, db = vjp(cot)
    assert da.dtype == db.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(da, np.float64), np.einsum(f"{res},{rhs}->{lhs}", g64, b64),
                               rtol=2**-8, atol=1e-2)
    np.testing.assert_allclose(np.asarray(db, np.float64), np.einsum(f"{res},{lhs}->{rhs}", g64, a64),
                               rtol=2**-8, atol=1e-2)


def dot_operand_types(fn, *args) -> list[str]:
    """The operand element types of every dot_general in fn's lowered program."""
    text = jax.jit(fn).lower(*args).as_text()
    return re.findall(r"stablehlo\.dot_general.*?: \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\)", text)


def test_bf16_attention_and_adapted_dense_backward_have_no_float32_matmul():
    """The point of accum_einsum: every matmul of the bf16 attention's and CGC-LoRA layer's
    gradient reads bf16 operands (autodiff of a float32-out einsum widened half of them)."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 5, 6, 4)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.normal(size=(2, 5, 3, 4)), jnp.bfloat16) for _ in range(2))
    allowed = jnp.tril(jnp.ones((5, 5), bool))[None].repeat(2, 0)
    loss = lambda q, k, v: grouped_attention(q, k, v, allowed).astype(jnp.float32).sum()
    types = dot_operand_types(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
    assert len(types) >= 5 and all(t == ("bf16", "bf16") for t in types), types  # q k^T, p v, 4 grads

    # uniform weights: the gate's own float32 matmuls are not the layer's
    cfg = CGCLoRAConfig(num_tasks=2, num_common=2, common_rank=2, specific_rank=1, gate="uniform")
    x = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.bfloat16)
    tasks = jnp.asarray([0, 1])

    class Adapted(nn.Module):
        @nn.compact
        def __call__(self, x, tasks):
            routing = TaskRouting(cfg, name="task_gate")(tasks, x.shape[0])
            return Dense(5, lora=cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, name="dense")(x, routing)

    model = Adapted()
    params = model.init(jax.random.key(0), x, tasks)["params"]
    params = jax.tree.map(lambda p: p + 0.1, params)  # B != 0: every path carries a gradient
    types = dot_operand_types(
        jax.grad(lambda p, x: model.apply({"params": p}, x, tasks).astype(jnp.float32).sum(), argnums=(0, 1)),
        params, x)
    assert types and all(t == ("bf16", "bf16") for t in types), types


@pytest.mark.parametrize("spec, why", [
    ("...i,io->...o", "explicit form"),
    ("abi,ij->ab", "index \\['j'\\] of the second operand"),
    ("ab,bc", "explicit form"),
    ("aa,ab->b", "index \\['a'\\] repeats in the first operand"),
    ("ab,bc->acd", "output index \\['d'\\] is in neither operand"),
])
def test_bad_specs_are_named_errors(spec, why):
    a = jnp.ones((2, 3))
    with pytest.raises(ValueError, match=why):
        accum_einsum(spec, a, a)


def test_mixed_operand_dtypes_are_an_error():
    with pytest.raises(ValueError, match="float32 and bfloat16"):
        accum_einsum("ab,bc->ac", jnp.ones((2, 3)), jnp.ones((3, 2), jnp.bfloat16))


AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f_not_a_bf16_flag\nbugs\t\t: bf16_is_not_a_flag_here\n"
AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n"


def test_auto_dtype_is_bf16_only_where_bf16_matmuls_are_native():
    assert not cpu_has_native_bf16(AVX2) and cpu_has_native_bf16(AVX512_BF16) and cpu_has_native_bf16(ARM_BF16)
    assert not cpu_has_native_bf16("")
    assert resolve_dtype("auto", "cpu", AVX2) == "float32"
    assert resolve_dtype("auto", "cpu", AVX512_BF16) == resolve_dtype("auto", "cpu", ARM_BF16) == "bfloat16"
    assert resolve_dtype("auto", "gpu", AVX2) == resolve_dtype("auto", "tpu", AVX2) == "bfloat16"
    assert resolve_dtype("bfloat16", "cpu", AVX2) == "bfloat16" and resolve_dtype("float32", "gpu") == "float32"


def test_a_config_dtype_of_auto_loads_the_base_in_this_machines_dtype(monkeypatch):
    import ml_collections

    from cgc_lora_jax import precision
    from cgc_lora_jax.run import load_base

    model_cfg = ml_collections.ConfigDict({"path": "", "builtin": "tiny-chatglm", "dtype": "auto", "remat": False})
    monkeypatch.setattr(precision.jax, "default_backend", lambda: "cpu")  # the CPU rule, on any machine
    for cpuinfo, want in ((AVX2, np.dtype("float32")), (AVX512_BF16, np.dtype(jnp.bfloat16))):
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda info=None, c=cpuinfo: "avx512_bf16" in c)
        base = load_base(model_cfg, lora=None, with_tokenizer=False)
        assert {leaf.dtype for leaf in jax.tree.leaves(base.params)} == {want}
    with pytest.raises(ValueError, match=r"model.dtype='float16': expected one of .*'auto'"):
        load_base(ml_collections.ConfigDict({**model_cfg.to_dict(), "dtype": "float16"}), lora=None)
