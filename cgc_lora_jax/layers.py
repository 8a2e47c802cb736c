"""CGC-LoRA: a Dense layer with task-common and task-specific low-rank experts.

A targeted dense layer with frozen kernel W0 [d_in, d_out] (and bias b) computes, for a sample of
task t,

    y = x W0 + b + s * sum_i w_i(t) * (x A_i) B_i,        s = alpha / r

over N_c task-common experts (shared by every task) and the task's own specific expert; the other
tasks' specific experts get weight exactly zero. Expert i has A_i [d_in, r_i] (Gaussian init) and
B_i [r_i, d_out] (zero init). r is the total rank of all experts, r = N_c * r_c + M * r_s for M
tasks, so the trainable count equals a plain LoRA of rank r: r * (d_in + d_out) per layer.

The weights come from the task ID only (paper eq. 5-7, the "task-motivated gate"):

    e_t = E[:, t]                                         E: [d_e, M] task embedding
    logits = [e_t W_c (N_c common logits), e_t . V[:, t]]  W_c: [d_e, N_c], V: [d_e, M]
    w(t) = softmax(logits)                                 over N_c + 1 slots

Gate modes: "shared" (one gate for the model, computed once per forward by `TaskRouting` and
handed to every wrapped layer; the paper's default), "per_layer" (each layer owns a gate) and
"uniform" (w = 1 / number of slots; the paper's "w/o gate" ablation). The paper's baselines are
settings of the same layer, see `CGCLoRAConfig.lora_full`, `.lora_single` and `.moe_lora`, and
cgc_lora_jax/baselines.py for all of them at one total rank.

The computation is fused: x is multiplied by all A's concatenated [d_in, r], each sample's rank
columns are scaled by its gate weights, and the result by all B's concatenated [r, d_out]. There is
no loop over experts or tasks, so one batch may mix tasks.

Usage inside a Flax model (the base parameter paths stay those of `nn.Dense`; the adapters live in
the sibling subtree `.../<layer>/lora/{A, B}`)::

    cfg = CGCLoRAConfig(num_tasks=4, targets=r"query_key_value|dense")
    routing = TaskRouting(cfg, name="task_gate")(task_ids, x.shape[0])   # once per forward
    y = Dense(3 * d, lora=cfg, name="query_key_value")(x, routing)
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from cgc_lora_jax import baselines
from cgc_lora_jax.precision import accum_einsum

Array = jax.Array
GATE_MODES = ("shared", "per_layer", "uniform")


@dataclasses.dataclass(frozen=True)
class CGCLoRAConfig:
    """Expert layout, gate and targets of the CGC-LoRA adapters of one model."""

    num_tasks: int  # M: number of tasks (task IDs are 0..M-1)
    num_common: int = 8  # N_c: task-common experts shared by every task
    common_rank: int = 2  # r_c: rank of each common expert
    specific_rank: int = 2  # r_s: rank of each task-specific expert (0: none)
    alpha: float = 32.0  # LoRA alpha; the update is scaled by alpha / total_rank
    gate: str = "shared"  # "shared" | "per_layer" | "uniform" (see module docstring)
    task_embed_dim: int = 64  # d_e: width of the task embedding E
    init_std: float = 0.02  # standard deviation of the Gaussian init of every A
    dropout: float = 0.0  # dropout rate on the adapter input (the base path never drops)
    targets: str = ".*"  # regex searched in the layer path "a/b/query_key_value"

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"CGCLoRAConfig.{field}={getattr(self, field)!r}: {why}")

        if self.num_tasks < 1:
            bad("num_tasks", "need at least one task")
        for field in ("num_common", "common_rank", "specific_rank"):
            if getattr(self, field) < 0:
                bad(field, "must be >= 0")
        if self.num_common > 0 and self.common_rank == 0:
            bad("common_rank", "common experts need a rank >= 1")
        if self.total_rank == 0:
            bad("num_common", "no experts: set num_common >= 1 or specific_rank >= 1")
        if self.gate not in GATE_MODES:
            bad("gate", f"must be one of {GATE_MODES}")
        if self.gate != "uniform" and self.task_embed_dim < 1:
            bad("task_embed_dim", "a gate needs task_embed_dim >= 1")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", "must be in [0, 1)")
        try:
            re.compile(self.targets)
        except re.error as e:
            bad("targets", f"not a regular expression ({e})")

    @property
    def total_rank(self) -> int:
        """r: the summed rank of all experts, common and every task's specific one."""
        return self.num_common * self.common_rank + self.num_tasks * self.specific_rank

    @property
    def task_rank(self) -> int:
        """Rank of the plain LoRA that one task's experts fold into: N_c * r_c + r_s."""
        return self.num_common * self.common_rank + self.specific_rank

    @property
    def num_slots(self) -> int:
        """Gate outputs: N_c common weights plus one for the task's own expert (if any)."""
        return self.num_common + (1 if self.specific_rank > 0 else 0)

    @property
    def scaling(self) -> float:
        return self.alpha / self.total_rank

    def is_target(self, path: str) -> bool:
        return re.search(self.targets, path) is not None

    # The paper's baselines as settings of this layer; their layouts are defined in baselines.py.
    @classmethod
    def lora_full(cls, num_tasks: int, rank: int, **kw) -> CGCLoRAConfig:
        """Baseline "LoRA Full": one LoRA of rank `rank` shared by all tasks, no gate."""
        return cls(num_tasks, **baselines.lora_full(rank), **kw)

    @classmethod
    def lora_single(cls, num_tasks: int, rank: int, **kw) -> CGCLoRAConfig:
        """Baseline "LoRA Single": one LoRA of rank `rank` per task, nothing shared."""
        return cls(num_tasks, **baselines.lora_single(rank), **kw)

    @classmethod
    def moe_lora(cls, num_tasks: int, num_experts: int, rank: int, **kw) -> CGCLoRAConfig:
        """Baseline "MOE-LoRA": `num_experts` common experts mixed by the task gate."""
        return cls(num_tasks, **baselines.moe_lora(num_experts, rank), **kw)


@struct.dataclass
class AdapterInputs:
    """What every wrapped layer needs about the batch: task IDs [B], the shared gate's weights and
    their spread onto the rank columns (computed once per forward, not once per layer)."""

    task_ids: Array  # [B] int32
    gate_weights: Array | None = None  # [B, num_slots]; set in "shared" mode only
    rank_scales: Array | None = None  # [B, total_rank] = rank_scales(weights); "shared" and "uniform"


def gate_weights(gate_params: dict, task_ids: Array, cfg: CGCLoRAConfig) -> Array:
    """Paper eq. 5-7: softmax over [e_t W_c, e_t . V_t] -> [B, num_slots] (float32)."""
    embed = gate_params["task_embedding"].astype(jnp.float32)  # [d_e, M]
    e_bd = jnp.take(embed, task_ids, axis=1).T
    logits = []
    if cfg.num_common:
        logits.append(e_bd @ gate_params["common"].astype(jnp.float32))
    if cfg.specific_rank:
        v_bd = jnp.take(gate_params["specific"].astype(jnp.float32), task_ids, axis=1).T
        logits.append(jnp.sum(e_bd * v_bd, axis=-1, keepdims=True))
    return jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1)


def uniform_weights(task_ids: Array, cfg: CGCLoRAConfig) -> Array:
    """The "w/o gate" ablation: every active slot weighs 1 / num_slots."""
    return jnp.full((task_ids.shape[0], cfg.num_slots), 1.0 / cfg.num_slots, jnp.float32)


def rank_scales(weights: Array, task_ids: Array, cfg: CGCLoRAConfig) -> Array:
    """Spread slot weights [B, num_slots] onto the rank columns [B, total_rank].

    Column layout of the concatenated A / B: the N_c common experts (r_c columns each), then the
    M specific experts (r_s columns each) in task order. A sample's columns of other tasks'
    specific experts get exactly 0.
    """
    weights = weights.astype(jnp.float32)
    parts = []
    if cfg.num_common:
        parts.append(jnp.repeat(weights[:, : cfg.num_common], cfg.common_rank, axis=1))
    if cfg.specific_rank:
        own = jax.nn.one_hot(task_ids, cfg.num_tasks, dtype=jnp.float32) * weights[:, -1:]
        parts.append(jnp.repeat(own, cfg.specific_rank, axis=1))
    return jnp.concatenate(parts, axis=1)


def lora_delta(x: Array, lora_a: Array, lora_b: Array, scales: Array, scaling: float) -> Array:
    """s * ((x A) * scales) B for x [B, ..., d_in] and per-sample scales [B, r]; float32 out."""
    lead = _lead(x)
    h = accum_einsum(f"{lead}i,ir->{lead}r", x, lora_a)
    scales = scales.reshape(scales.shape[:1] + (1,) * (h.ndim - 2) + scales.shape[1:])
    h = (h * (scales * scaling)).astype(lora_b.dtype)
    return accum_einsum(f"{lead}r,ro->{lead}o", h, lora_b)


def _lead(x: Array) -> str:
    """Einsum letters for x's leading (batch and position) axes."""
    return "abcdefgh"[: x.ndim - 1]


def cgc_lora_dense(
    x: Array,
    kernel: Array,
    lora: dict,
    weights: Array,
    task_ids: Array,
    cfg: CGCLoRAConfig,
    bias: Array | None = None,
) -> Array:
    """Functional CGC-LoRA dense for non-Linen code: x W0 + b + s * sum_i w_i (x A_i) B_i.

    x: [B, ..., d_in]; kernel: [d_in, d_out]; lora: {"A": [d_in, r], "B": [r, d_out]};
    weights: slot weights [B, num_slots] (from `gate_weights` or `uniform_weights`);
    task_ids: [B]. Everything computes in x's dtype (the adapter path accumulates in float32);
    the result has x's dtype.
    """
    y = _base_dense(x, kernel, bias, jnp.float32)
    scales = rank_scales(weights, task_ids, cfg)
    delta = lora_delta(x, lora["A"].astype(x.dtype), lora["B"].astype(x.dtype), scales, cfg.scaling)
    return (y + delta).astype(x.dtype)


def _base_dense(x: Array, kernel: Array, bias: Array | None, out_dtype=None) -> Array:
    """x W0 + b accumulated in float32, in `out_dtype` (None: x's dtype). accum_einsum keeps the
    backward's matmuls in x's dtype too: autodiff of a float32 output cast back to bf16 would hand
    the backward a float32 gradient and make XLA convert every frozen bf16 kernel to float32 (a
    float32 copy of the model). An adapted layer takes the float32 sum and adds its delta before
    the one rounding: XLA:CPU does not fuse a cast into the matmul, so a bf16 result here would
    cost a separate pass over the output (and a second rounding)."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    y = accum_einsum(f"{_lead(x)}i,io->{_lead(x)}o", x, kernel.astype(x.dtype), out_dtype=out_dtype)
    return y if bias is None else y + bias.astype(out_dtype)


def adapter_initializers(cfg: CGCLoRAConfig) -> dict[str, Any]:
    """The initializer of each adapter parameter, by its name: experts A (Gaussian) and B (zero),
    the gate's E (unit Gaussian) and W_c, V (Gaussian of std d_e^-1/2). The modules below declare
    their parameters with these, and `init_adapters` draws them without tracing a model."""
    slot_init = nn.initializers.normal(cfg.task_embed_dim**-0.5)
    return {"A": nn.initializers.normal(cfg.init_std), "B": nn.initializers.zeros,
            "task_embedding": nn.initializers.normal(1.0), "common": slot_init, "specific": slot_init}


def init_adapters(abstract: dict[tuple[str, ...], Any], cfg: CGCLoRAConfig, seed: int) -> dict:
    """{path: initial value} for the adapter leaves of `abstract` ({flat path: ShapeDtypeStruct}),
    each drawn with the key `seed` folded with the path's CRC-32, so a value depends on its path
    alone (not on the device layout or the other leaves).

    Drawn eagerly, one small compiled program per shape: jitting a Flax init instead compiles one
    random program per leaf (25 s for the 423 adapter leaves of SmolLM2-135M on a CPU).
    """
    inits, root = adapter_initializers(cfg), jax.random.key(seed)
    out = {}
    for path, leaf in abstract.items():
        if path[-1] not in inits:
            raise ValueError(f"adapter parameter {'/'.join(path)}: no initializer for {path[-1]!r}")
        key = jax.random.fold_in(root, zlib.crc32("/".join(path).encode()))
        out[path] = inits[path[-1]](key, leaf.shape, leaf.dtype)
    return out


def _make_gate_params(module: nn.Module, cfg: CGCLoRAConfig) -> dict:
    """Declare the gate's parameters E [d_e, M], W_c [d_e, N_c], V [d_e, M] (float32) on `module`."""
    param_dtype, d_e, inits = jnp.float32, cfg.task_embed_dim, adapter_initializers(cfg)
    params = {"task_embedding": module.param("task_embedding", inits["task_embedding"], (d_e, cfg.num_tasks), param_dtype)}
    if cfg.num_common:
        params["common"] = module.param("common", inits["common"], (d_e, cfg.num_common), param_dtype)
    if cfg.specific_rank:
        params["specific"] = module.param("specific", inits["specific"], (d_e, cfg.num_tasks), param_dtype)
    return params


class TaskGate(nn.Module):
    """The task-motivated gate's parameters; returns slot weights [B, num_slots]."""

    cfg: CGCLoRAConfig

    @nn.compact
    def __call__(self, task_ids: Array) -> Array:
        return gate_weights(_make_gate_params(self, self.cfg), task_ids, self.cfg)


class TaskRouting(nn.Module):
    """Builds the `AdapterInputs` of a forward pass: call once at the model's top.

    Name it "task_gate": in "shared" mode the gate's parameters live under it.
    """

    cfg: CGCLoRAConfig

    @nn.compact
    def __call__(self, task_ids: Array | None, batch_size: int) -> AdapterInputs:
        if task_ids is None:
            if self.cfg.num_tasks != 1:
                raise ValueError(
                    f"the model has CGC-LoRA adapters for {self.cfg.num_tasks} tasks: "
                    "pass task_ids [batch] (int) to the forward"
                )
            task_ids = jnp.zeros((batch_size,), jnp.int32)
        task_ids = jnp.asarray(task_ids, jnp.int32)
        if task_ids.shape != (batch_size,):
            raise ValueError(f"task_ids has shape {task_ids.shape}, expected ({batch_size},)")
        weights = scales = None
        if self.cfg.gate == "shared":
            weights = gate_weights(_make_gate_params(self, self.cfg), task_ids, self.cfg)
        elif self.cfg.gate == "uniform":
            weights = uniform_weights(task_ids, self.cfg)
        if weights is not None:
            scales = rank_scales(weights, task_ids, self.cfg)
        return AdapterInputs(task_ids=task_ids, gate_weights=weights if self.cfg.gate == "shared" else None,
                             rank_scales=scales)


class ExpertBank(nn.Module):
    """The concatenated experts A [d_in, r] and B [r, d_out] of one layer (and its gate).

    Master weights are float32 whatever the base's dtype (small updates survive, and the
    optimizer state is float32); they are cast to the activation dtype for the matmuls.
    """

    cfg: CGCLoRAConfig
    features: int

    @nn.compact
    def __call__(self, x: Array, adapters: AdapterInputs, deterministic: bool = True) -> Array:
        cfg, r = self.cfg, self.cfg.total_rank
        inits = adapter_initializers(cfg)
        lora_a = self.param("A", inits["A"], (x.shape[-1], r), jnp.float32)
        lora_b = self.param("B", inits["B"], (r, self.features), jnp.float32)
        if cfg.gate == "per_layer":
            scales = rank_scales(TaskGate(cfg, name="gate")(adapters.task_ids), adapters.task_ids, cfg)
        elif adapters.rank_scales is not None:
            scales = adapters.rank_scales
        elif cfg.gate == "uniform":
            scales = rank_scales(uniform_weights(adapters.task_ids, cfg), adapters.task_ids, cfg)
        elif adapters.gate_weights is None:
            raise ValueError(
                f"layer {'/'.join(self.path[:-1])}: shared gate mode needs AdapterInputs with "
                "gate_weights; build them with TaskRouting at the model's top"
            )
        else:
            scales = rank_scales(adapters.gate_weights, adapters.task_ids, cfg)
        if cfg.dropout:
            x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        return lora_delta(x, lora_a.astype(x.dtype), lora_b.astype(x.dtype), scales, cfg.scaling)


class Dense(nn.Module):
    """`nn.Dense` with the same parameters (kernel [d_in, d_out], bias), plus CGC-LoRA experts
    in the child "lora" when `lora` is set and its `targets` regex matches this layer's path.

    Computes in `dtype` (default: x's dtype); the adapters add their float32-accumulated update
    (`ExpertBank`) before the cast back to `dtype`.
    """

    features: int
    use_bias: bool = True
    lora: CGCLoRAConfig | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros

    @property
    def is_adapted(self) -> bool:
        return self.lora is not None and self.lora.is_target("/".join(self.path))

    @nn.compact
    def __call__(
        self, x: Array, adapters: AdapterInputs | None = None, deterministic: bool = True
    ) -> Array:
        dtype = self.dtype or x.dtype
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        x = x.astype(dtype)
        if not self.is_adapted:
            return _base_dense(x, kernel, bias)
        if adapters is None:
            raise ValueError(f"layer {'/'.join(self.path)} has CGC-LoRA adapters: pass AdapterInputs")
        delta = ExpertBank(self.lora, self.features, name="lora")(x, adapters, deterministic)
        return (_base_dense(x, kernel, bias, jnp.float32) + delta).astype(dtype)
