"""Llama and Qwen2 decoder-only transformers in Flax, with CGC-LoRA on every dense layer.

One block, pre-norm (Qwen2 = Llama with a bias on q/k/v):

    h = x + o_proj(Attn(RoPE(q_proj(n)), RoPE(k_proj(n)), v_proj(n))),   n = RMSNorm(x)
    y = h + down_proj(silu(gate_proj(m)) * up_proj(m)),                   m = RMSNorm(h)
    RMSNorm(x) = w * x / sqrt(mean(x^2) + eps)        (float32 arithmetic, like the original)
    Attn = softmax(q k^T / sqrt(head_dim) + causal and padding mask) v   (float32 softmax)

RoPE uses rotate-half pairs (x_i, x_{i+D/2}) with inv_freq = 1 / theta^(2i/D) (optionally rescaled,
"linear" or "llama3"). Grouped-query attention: K/V have `num_key_value_heads` heads, each serving
num_heads / num_kv_heads consecutive query heads. Logits = lm_head(RMSNorm(h_L)), or h_L E^T when
the embeddings are tied. Positions follow left padding: cumsum(attention_mask) - 1, clipped at 0.

    cfg = LlamaConfig.from_hf(json.load(open("config.json")))
    model = LlamaForCausalLM(cfg, lora=CGCLoRAConfig(num_tasks=4, targets="q_proj|v_proj"))
    logits = model.apply({"params": params}, input_ids, attention_mask, task_ids)

The KV cache (`init_cache`, `decode`) holds keys after RoPE in fixed [B, max_length] slots; the
prompt fills slots from 0 and each step writes the next slot, so decoding never changes shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from cgc_lora_jax.layers import AdapterInputs, CGCLoRAConfig, Dense, TaskRouting
from cgc_lora_jax.data.packing import segment_mask, segment_positions
from cgc_lora_jax.sharding import ADAPTER_RULES
from cgc_lora_jax.models.family import KeyMap, ModelFamily, register

Array = jax.Array
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama / Qwen2 checkpoint (the fields of its config.json that matter)."""

    vocab_size: int  # rows of embed_tokens and lm_head
    hidden_size: int  # d_model
    intermediate_size: int  # width of gate_proj / up_proj
    num_hidden_layers: int  # decoder blocks
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # K/V heads (grouped-query attention; = num_attention_heads for MHA)
    head_dim: int  # width of one head (hidden_size / num_attention_heads unless stated)
    rms_norm_eps: float  # eps inside every RMSNorm
    rope_theta: float = 10000.0  # RoPE base wavelength
    rope_type: str = "default"  # "default" | "linear" | "llama3" inverse-frequency rescaling
    rope_factor: float = 1.0  # linear / llama3 scaling factor
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_position: int = 8192  # llama3 only: pretraining context length
    qkv_bias: bool = False  # bias on q/k/v_proj (Qwen2; Llama attention_bias)
    o_bias: bool = False  # bias on o_proj (Llama attention_bias)
    mlp_bias: bool = False  # bias on gate/up/down_proj (Llama mlp_bias)
    tie_word_embeddings: bool = False  # logits use embed_tokens^T; no lm_head tensor
    model_type: str = "llama"  # "llama" | "qwen2"
    hf_config: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> LlamaConfig:
        """Read a Hugging Face LlamaConfig / Qwen2Config dict; a missing field is a ValueError."""

        def need(name):
            if name not in hf or hf[name] is None:
                family = hf.get("model_type", "llama/qwen2")
                raise ValueError(f"{source}: missing field {name!r} (needed by the {family} family)")
            return hf[name]

        model_type = need("model_type")
        if model_type not in ("llama", "qwen2"):
            raise ValueError(f"{source}: model_type={model_type!r} is neither 'llama' nor 'qwen2'")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act={hf['hidden_act']!r}; only 'silu' is implemented")
        if hf.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window=true is not implemented (full attention only)")
        heads = need("num_attention_heads")
        # transformers >= 5 writes rope_parameters {rope_type, rope_theta, ...}; older files
        # write rope_theta at the top level and rope_scaling {type | rope_type, factor, ...}.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"{source}: rope type {rope_type!r} is not implemented; known: {ROPE_TYPES}")
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or need("hidden_size") // heads,
            rms_norm_eps=float(need("rms_norm_eps")),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position=int(
                rope.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192))
            ),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type == "llama" and attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            model_type=model_type,
            hf_config=dict(hf),
        )


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """inv_freq [head_dim/2] float32, computed like transformers' rope init functions."""
    dim = cfg.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = 1.0 / (np.float32(cfg.rope_theta) ** exponents)
    if cfg.rope_type == "linear":
        inv_freq = inv_freq / np.float32(cfg.rope_factor)
    elif cfg.rope_type == "llama3":
        # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
        low_wavelen = cfg.rope_original_max_position / cfg.rope_low_freq_factor
        high_wavelen = cfg.rope_original_max_position / cfg.rope_high_freq_factor
        wavelen = 2 * np.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / cfg.rope_factor, inv_freq)
        smooth = (cfg.rope_original_max_position / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def rope_cos_sin(positions_bt: Array, inv_freq: np.ndarray, dtype) -> tuple[Array, Array]:
    """cos, sin [B, T, 1, head_dim] of angles pos * inv_freq, duplicated for rotate-half."""
    angles = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x_bthd: Array, cos: Array, sin: Array) -> Array:
    """x cos + rotate_half(x) sin, with rotate_half([a, b]) = [-b, a]."""
    half = x_bthd.shape[-1] // 2
    rotated = jnp.concatenate([-x_bthd[..., half:], x_bthd[..., :half]], axis=-1)
    return x_bthd * cos + rotated * sin


def left_pad_positions(attention_mask: Array, start: Array | int = 0) -> Array:
    """Positions of a left-padded chunk: start + cumsum(mask) - 1, clipped at 0 (pads get 0)."""
    positions = jnp.asarray(start)[..., None] + jnp.cumsum(attention_mask, axis=-1) - 1
    return jnp.maximum(positions, 0).astype(jnp.int32)


def grouped_attention(q_bthd: Array, k_bksd: Array, v_bksd: Array, mask_bts: Array) -> Array:
    """softmax(q k^T / sqrt(D), masked) v with K/V heads shared by groups of query heads.

    K/V come heads-major [B, KV, S, D], the layout both matmuls read without a transpose, so a
    decode step never copies the whole cache.
    """
    b, t, h, d = q_bthd.shape
    kv = k_bksd.shape[1]
    q = q_bthd.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k_bksd, preferred_element_type=jnp.float32) * d**-0.5
    scores = jnp.where(mask_bts[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bksd.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v_bksd, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q_bthd.dtype)


class RMSNorm(nn.Module):
    """w * x / sqrt(mean(x^2) + eps), normalised in float32 and cast back before the scale."""

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return weight.astype(self.dtype) * normed.astype(self.dtype)


class LlamaAttention(nn.Module):
    """q/k/v/o projections, RoPE, grouped-query attention; writes K/V into `layer_cache` if given
    ({"key", "value"} [B, KV, S, D], slots from `cache_index` on)."""

    config: LlamaConfig
    lora: CGCLoRAConfig | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, mask_bts, adapters, deterministic, layer_cache=None, cache_index=0):
        cfg = self.config
        b, t, _ = x.shape

        def proj(features, use_bias, name, inputs):
            return Dense(features, use_bias, self.lora, self.dtype, self.param_dtype, name=name)(
                inputs, adapters, deterministic
            )

        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = apply_rope(proj(h * d, cfg.qkv_bias, "q_proj", x).reshape(b, t, h, d), cos, sin)
        k = apply_rope(proj(kv * d, cfg.qkv_bias, "k_proj", x).reshape(b, t, kv, d), cos, sin)
        v = proj(kv * d, cfg.qkv_bias, "v_proj", x).reshape(b, t, kv, d)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # heads-major [B, KV, T, D]
        if layer_cache is not None:

            def write(cached, new):
                return jax.lax.dynamic_update_slice(cached, new.astype(cached.dtype), (0, 0, cache_index, 0))

            layer_cache = {"key": write(layer_cache["key"], k), "value": write(layer_cache["value"], v)}
            k, v = layer_cache["key"].astype(q.dtype), layer_cache["value"].astype(q.dtype)
            if jax.default_backend() == "cpu" and q.dtype == jnp.bfloat16:
                # XLA:CPU runs a dot over the cache buffer as a DotThunk, which has no bf16 x bf16 ->
                # f32 kernel: attend in float32 there (the cache is small next to the weights)
                q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
        out = grouped_attention(q, k, v, mask_bts).reshape(b, t, -1).astype(x.dtype)
        return proj(cfg.hidden_size, cfg.o_bias, "o_proj", out), layer_cache


class LlamaMLP(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x))."""

    config: LlamaConfig
    lora: CGCLoRAConfig | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, adapters, deterministic):
        cfg = self.config

        def proj(features, name, inputs):
            return Dense(features, cfg.mlp_bias, self.lora, self.dtype, self.param_dtype, name=name)(
                inputs, adapters, deterministic
            )

        gate, up = proj(cfg.intermediate_size, "gate_proj", x), proj(cfg.intermediate_size, "up_proj", x)
        return proj(cfg.hidden_size, "down_proj", nn.silu(gate) * up)


class LlamaBlock(nn.Module):
    """x + attn(RMSNorm(x)), then + mlp(RMSNorm(.)); returns (x, updated layer_cache)."""

    config: LlamaConfig
    lora: CGCLoRAConfig | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, mask_bts, adapters, deterministic, layer_cache=None, cache_index=0):
        sub = (self.config, self.lora, self.dtype, self.param_dtype)

        def norm(name):
            return RMSNorm(self.config.rms_norm_eps, self.dtype, self.param_dtype, name=name)

        attn_out, layer_cache = LlamaAttention(*sub, name="self_attn")(
            norm("input_layernorm")(x), cos, sin, mask_bts, adapters, deterministic, layer_cache, cache_index
        )
        x = x + attn_out
        mlp_out = LlamaMLP(*sub, name="mlp")(norm("post_attention_layernorm")(x), adapters, deterministic)
        return x + mlp_out, layer_cache


class LlamaModel(nn.Module):
    """embed_tokens -> layers_0..L-1 -> norm; the HF `model.` prefix."""

    config: LlamaConfig
    lora: CGCLoRAConfig | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        cfg = self.config
        # deterministic (argument 6, counting self) is a Python bool: static under remat.
        block = nn.remat(LlamaBlock, static_argnums=(6,)) if self.remat else LlamaBlock
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, self.dtype, self.param_dtype)
        self.layers = [
            block(cfg, self.lora, self.dtype, self.param_dtype) for _ in range(cfg.num_hidden_layers)
        ]
        self.norm = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype)

    def __call__(
        self, input_ids, positions_bt, mask_bts, adapters, deterministic, cache_layers=None, cache_index=0
    ):
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions_bt, rope_inv_freq(self.config), self.dtype)
        new_cache = []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache_layers is None else cache_layers[i]
            x, layer_cache = layer(x, cos, sin, mask_bts, adapters, deterministic, layer_cache, cache_index)
            new_cache.append(layer_cache)
        return self.norm(x), (None if cache_layers is None else tuple(new_cache))


class LlamaForCausalLM(nn.Module):
    """The causal LM: `model` + `lm_head` (or tied embeddings) + the CGC-LoRA `task_gate`."""

    config: LlamaConfig
    lora: CGCLoRAConfig | None = None
    dtype: Any = jnp.float32  # activation / compute dtype
    param_dtype: Any = jnp.float32  # parameter storage dtype
    remat: bool = False  # rematerialise each block in the backward pass

    def setup(self):
        self.model = LlamaModel(self.config, self.lora, self.dtype, self.param_dtype, self.remat)
        if not self.config.tie_word_embeddings:
            self.lm_head = Dense(self.config.vocab_size, False, self.lora, self.dtype, self.param_dtype)
        if self.lora is not None:
            self.task_gate = TaskRouting(self.lora)

    def _adapters(self, task_ids, batch_size) -> AdapterInputs | None:
        return None if self.lora is None else self.task_gate(task_ids, batch_size)

    def _logits(self, hidden, adapters, deterministic) -> Array:
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.attend(hidden).astype(jnp.float32)
        return self.lm_head(hidden, adapters, deterministic).astype(jnp.float32)

    def __call__(self, input_ids, attention_mask=None, task_ids=None, deterministic=True, segment_ids=None):
        """logits [B, T, V] float32 for left-padded input_ids [B, T] (mask 1 = token, 0 = pad), or
        for packed rows: segment_ids [B, T] (cgc_lora_jax/data/packing.py) instead of attention_mask."""
        hidden, adapters = self._hidden(input_ids, attention_mask, task_ids, deterministic, segment_ids)
        return self._logits(hidden, adapters, deterministic)

    def hidden_states(self, input_ids, attention_mask=None, task_ids=None, deterministic=True, segment_ids=None):
        """The final normed hidden states [B, T, d] that `__call__` feeds to the head; with
        `frozen_head` the training loss takes the head on target positions only (target_loss.py)."""
        return self._hidden(input_ids, attention_mask, task_ids, deterministic, segment_ids)[0]

    def frozen_head(self, params: dict) -> Array | None:
        """The output matrix [V, d] (logits = h W^T) from `params`, or None when the head has adapters."""
        if self.config.tie_word_embeddings:
            return params["model"]["embed_tokens"]["embedding"]
        if self.lora is not None and self.lora.is_target("lm_head"):
            return None
        return params["lm_head"]["kernel"].T

    def _hidden(self, input_ids, attention_mask, task_ids, deterministic, segment_ids=None):
        b, t = input_ids.shape
        if segment_ids is not None:  # packed rows: each segment attends to itself from position 0
            if attention_mask is not None:
                raise ValueError("pass attention_mask or segment_ids, not both (segment 0 is padding)")
            mask_bts, positions = segment_mask(segment_ids), segment_positions(segment_ids)
        else:
            if attention_mask is None:
                attention_mask = jnp.ones((b, t), jnp.int32)
            key_valid = attention_mask.astype(bool)
            mask_bts = jnp.tril(jnp.ones((t, t), bool))[None] & key_valid[:, None, :]
            positions = left_pad_positions(attention_mask)
        adapters = self._adapters(task_ids, b)
        hidden, _ = self.model(input_ids, positions, mask_bts, adapters, deterministic)
        return hidden, adapters

    def init_cache(self, batch_size: int, max_length: int) -> dict:
        """Empty KV cache: slots [0, max_length) per row, all invalid; needs no parameters.

        index: next slot to write; next_position [B]: RoPE position of the row's next token;
        key_valid [B, S]: slots holding a real token (pads and unwritten slots are False).
        """
        cfg, dtype = self.config, self.dtype
        shape = (batch_size, cfg.num_key_value_heads, max_length, cfg.head_dim)
        return {
            "index": jnp.zeros((), jnp.int32),
            "next_position": jnp.zeros((batch_size,), jnp.int32),
            "key_valid": jnp.zeros((batch_size, max_length), bool),
            "layers": tuple(
                {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}
                for _ in range(cfg.num_hidden_layers)
            ),
        }

    def decode(self, input_ids, attention_mask=None, task_ids=None, cache=None, deterministic=True,
               last_only=False):
        """Append a chunk (the prompt, then one token per row) to the cache: (logits, cache).

        The chunk's T tokens go to slots [index, index + T); query slot j sees key slots <= j that
        hold real tokens. Positions continue each row's count of real tokens. last_only: logits of
        the chunk's last position only, [B, 1, V] (generation's prefill needs no more; the head
        over a whole prompt costs about a quarter of this model's prefill).
        """
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        index = cache["index"]
        key_valid = jax.lax.dynamic_update_slice(
            cache["key_valid"], attention_mask.astype(bool), (0, index)
        )
        slots = jnp.arange(key_valid.shape[1])
        causal_ts = slots[None, :] <= (index + jnp.arange(t))[:, None]
        mask_bts = causal_ts[None] & key_valid[:, None, :]
        positions = left_pad_positions(attention_mask, cache["next_position"])
        adapters = self._adapters(task_ids, b)
        hidden, layers = self.model(
            input_ids, positions, mask_bts, adapters, deterministic, cache["layers"], index
        )
        cache = {
            "index": index + t,
            "next_position": cache["next_position"] + jnp.sum(attention_mask, -1, dtype=jnp.int32),
            "key_valid": key_valid,
            "layers": layers,
        }
        hidden = hidden[:, -1:] if last_only else hidden
        return self._logits(hidden, adapters, deterministic), cache


def build(config: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, lora=None, remat=False):
    """The family's module constructor (models/family.py `ModelFamily.build`)."""
    return LlamaForCausalLM(config, lora=lora, dtype=dtype, param_dtype=param_dtype, remat=remat)


def key_map(config: LlamaConfig) -> KeyMap:
    """HF tensor name -> (Flax path, transpose?); torch Linear [out, in] -> Flax kernel [in, out]."""
    keys: KeyMap = {
        "model.embed_tokens.weight": (("model", "embed_tokens", "embedding"), False),
        "model.norm.weight": (("model", "norm", "weight"), False),
    }
    projections = (
        ("self_attn", "q_proj", config.qkv_bias),
        ("self_attn", "k_proj", config.qkv_bias),
        ("self_attn", "v_proj", config.qkv_bias),
        ("self_attn", "o_proj", config.o_bias),
        ("mlp", "gate_proj", config.mlp_bias),
        ("mlp", "up_proj", config.mlp_bias),
        ("mlp", "down_proj", config.mlp_bias),
    )
    for i in range(config.num_hidden_layers):
        hf, fx = f"model.layers.{i}.", ("model", f"layers_{i}")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            keys[f"{hf}{norm}.weight"] = (fx + (norm, "weight"), False)
        for parent, proj, has_bias in projections:
            keys[f"{hf}{parent}.{proj}.weight"] = (fx + (parent, proj, "kernel"), True)
            if has_bias:
                keys[f"{hf}{parent}.{proj}.bias"] = (fx + (parent, proj, "bias"), False)
    if not config.tie_word_embeddings:
        keys["lm_head.weight"] = (("lm_head", "kernel"), True)
    return keys


# Megatron layout: q/k/v/gate/up split their outputs over "tensor" (column-parallel), o/down their
# inputs (row-parallel), so each block needs one all-reduce per sublayer; "fsdp" shards the other
# kernel axis. Embeddings and norms stay replicated.
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$", P("fsdp", "tensor")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/bias$", P("tensor")),
    (r"(o_proj|down_proj)/kernel$", P("tensor", "fsdp")),
    (r"(o_proj|down_proj)/bias$", P()),
    (r"^lm_head/kernel$", P("fsdp", "tensor")),
    (r"embed_tokens/embedding$", P()),
    (r"(layernorm|norm)/weight$", P()),
    *ADAPTER_RULES,
    (r".*", P()),
)

IGNORED_KEYS = r"rotary_emb\.inv_freq$"
# Every linear layer of the blocks (levanter's default), not the vocabulary head.
DEFAULT_LORA_TARGETS = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"  # older checkpoints store the derived RoPE buffer


def _family(model_type: str) -> ModelFamily:
    """Llama and Qwen2 share the module, key map and rules; config.json's model_type tells them apart."""
    return register(
        ModelFamily(
            name=model_type,
            matches=lambda hf: hf.get("model_type") == model_type,
            config_from_hf=LlamaConfig.from_hf,
            build=build,
            key_map=key_map,
            ignored_keys=IGNORED_KEYS,
            partition_rules=PARTITION_RULES,
            default_lora_targets=DEFAULT_LORA_TARGETS,
        )
    )


LLAMA, QWEN2 = _family("llama"), _family("qwen2")
