"""Llama and Qwen2 decoder-only transformers in Flax, with CGC-LoRA on every dense layer.

One block, pre-norm (Qwen2 = Llama with a bias on q/k/v):

    h = x + o_proj(Attn(RoPE(q_proj(n)), RoPE(k_proj(n)), v_proj(n))),   n = RMSNorm(x)
    y = h + down_proj(silu(gate_proj(m)) * up_proj(m)),                   m = RMSNorm(h)
    RMSNorm(x) = w * x / sqrt(mean(x^2) + eps)        (float32 arithmetic, like the original)
    Attn = softmax(q k^T / sqrt(head_dim) + causal and padding mask) v   (float32 softmax)

RoPE uses rotate-half pairs (x_i, x_{i+D/2}) with inv_freq = 1 / theta^(2i/D) (optionally rescaled,
"linear" or "llama3"). Grouped-query attention: K/V have `num_key_value_heads` heads, each serving
num_heads / num_kv_heads consecutive query heads. Logits = lm_head(RMSNorm(h_L)), or h_L E^T when
the embeddings are tied. Positions follow left padding: cumsum(attention_mask) - 1, 0 on pads.
The blocks are models/blocks.py's (RMSNorm casts back before the scale, as transformers' does);
the checkpoint key map and partition rules are models/llama_keys.py.

    cfg = LlamaConfig.from_hf(json.load(open("config.json")))
    model = LlamaForCausalLM(cfg, lora=CGCLoRAConfig(num_tasks=4, targets="q_proj|v_proj"))
    logits = model.apply({"params": params}, input_ids, attention_mask, task_ids)

The KV cache (`init_cache`, `decode`; layout in models/blocks.py) holds keys after RoPE in fixed
[B, max_length] slots; the prompt fills slots from 0 and each step writes the next slot, so
decoding never changes shapes.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cgc_lora_jax.data.packing import segment_mask, segment_positions
from cgc_lora_jax.models.blocks import (CausalLM, FamilyModule, RMSNorm, apply_rope, cache_slots, cached_attention,
                                        init_kv_cache, left_pad_positions, rope_cos_sin)
from cgc_lora_jax.models.blocks import rope_inv_freq as rope_base_inv_freq
from cgc_lora_jax.models.family_spec import ModelFamily
from cgc_lora_jax.models.llama_keys import DEFAULT_LORA_TARGETS, IGNORED_KEYS, PARTITION_RULES, key_map

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
    inv_freq = rope_base_inv_freq(cfg.head_dim, cfg.rope_theta)
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


class LlamaAttention(FamilyModule):
    """q/k/v/o projections, RoPE, grouped-query attention; writes K/V into `layer_cache` if given
    (blocks.py's cache layout, slots from `cache_index` on)."""

    @nn.compact
    def __call__(self, x, cos, sin, mask_bts, adapters, deterministic, layer_cache=None, cache_index=0):
        cfg = self.config
        b, t, _ = x.shape

        def proj(features, use_bias, name, inputs):
            return self.dense(features, use_bias, name)(inputs, adapters, deterministic)

        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = apply_rope(proj(h * d, cfg.qkv_bias, "q_proj", x).reshape(b, t, h, d), cos, sin)
        k = apply_rope(proj(kv * d, cfg.qkv_bias, "k_proj", x).reshape(b, t, kv, d), cos, sin)
        v = proj(kv * d, cfg.qkv_bias, "v_proj", x).reshape(b, t, kv, d)
        # Every mask of this family is causal (tril & padding, or tril & segments).
        out, layer_cache = cached_attention(q, k, v, mask_bts, layer_cache, cache_index, causal=True)
        return proj(cfg.hidden_size, cfg.o_bias, "o_proj", out.reshape(b, t, -1)), layer_cache


class LlamaMLP(FamilyModule):
    """down_proj(silu(gate_proj(x)) * up_proj(x))."""

    @nn.compact
    def __call__(self, x, adapters, deterministic):
        cfg = self.config

        def proj(features, name, inputs):
            return self.dense(features, cfg.mlp_bias, name)(inputs, adapters, deterministic)

        gate, up = proj(cfg.intermediate_size, "gate_proj", x), proj(cfg.intermediate_size, "up_proj", x)
        return proj(cfg.hidden_size, "down_proj", nn.silu(gate) * up)


class LlamaBlock(FamilyModule):
    """x + attn(RMSNorm(x)), then + mlp(RMSNorm(.)); returns (x, updated layer_cache)."""

    @nn.compact
    def __call__(self, x, cos, sin, mask_bts, adapters, deterministic, layer_cache=None, cache_index=0):
        def norm(name):
            return RMSNorm(self.config.rms_norm_eps, self.dtype, self.param_dtype, name=name)

        attn_out, layer_cache = LlamaAttention(*self.fields, name="self_attn")(
            norm("input_layernorm")(x), cos, sin, mask_bts, adapters, deterministic, layer_cache, cache_index
        )
        x = x + attn_out
        mlp_out = LlamaMLP(*self.fields, name="mlp")(norm("post_attention_layernorm")(x), adapters, deterministic)
        return x + mlp_out, layer_cache


class LlamaModel(FamilyModule):
    """embed_tokens -> layers_0..L-1 -> norm; the HF `model.` prefix."""

    remat: bool = False

    def setup(self):
        cfg = self.config
        # deterministic (argument 6, counting self) is a Python bool: static under remat.
        block = nn.remat(LlamaBlock, static_argnums=(6,)) if self.remat else LlamaBlock
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, self.dtype, self.param_dtype)
        self.layers = [block(*self.fields) for _ in range(cfg.num_hidden_layers)]
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


class LlamaForCausalLM(CausalLM):
    """The causal LM: `model` + `lm_head` (or tied embeddings) + the CGC-LoRA `task_gate`."""

    def setup(self):
        super().setup()
        self.model = LlamaModel(*self.fields, self.remat)
        if not self.config.tie_word_embeddings:
            self.lm_head = self.dense(self.config.vocab_size, False)

    def _logits(self, hidden, adapters, deterministic) -> Array:
        if self.config.tie_word_embeddings:
            # h E^T in the compute dtype with float32 accumulation: Embed.attend's bfloat16 result
            # makes XLA:CPU run the whole head in float32 (half the bf16 matmul rate).
            embedding = self.model.embed_tokens.embedding.astype(self.dtype)
            return jnp.einsum("...d,vd->...v", hidden.astype(self.dtype), embedding,
                              preferred_element_type=jnp.float32)
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

    @nn.nowrap
    def init_cache(self, batch_size: int, max_length: int) -> dict:
        """Empty KV cache (models/blocks.py) of max_length slots per row; needs no parameters.
        Position state: next_position [B], the RoPE position of the row's next token."""
        cfg = self.config
        return init_kv_cache(batch_size, max_length, cfg.num_hidden_layers, cfg.num_key_value_heads,
                             cfg.head_dim, self.dtype, ("next_position",))

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
        valid, causal_ts = cache_slots(cache, attention_mask)
        positions = left_pad_positions(attention_mask, cache["next_position"])
        adapters = self._adapters(task_ids, b)
        hidden, layers = self.model(
            input_ids, positions, causal_ts[None] & valid[:, None, :], adapters, deterministic,
            cache["layers"], cache["index"],
        )
        cache = {
            "index": cache["index"] + t,
            "valid": valid,
            "layers": layers,
            "next_position": cache["next_position"] + jnp.sum(attention_mask, -1, dtype=jnp.int32),
        }
        hidden = hidden[:, -1:] if last_only else hidden
        return self._logits(hidden, adapters, deterministic), cache


build = LlamaForCausalLM.build


def _family(model_type: str) -> ModelFamily:
    """Llama and Qwen2 share the module, key map and rules; config.json's model_type tells them apart."""
    return ModelFamily(
        name=model_type,
        matches=lambda hf: hf.get("model_type") == model_type,
        config_from_hf=LlamaConfig.from_hf,
        build=build,
        key_map=key_map,
        ignored_keys=IGNORED_KEYS,
        partition_rules=PARTITION_RULES,
        default_lora_targets=DEFAULT_LORA_TARGETS,
    )


LLAMA, QWEN2 = _family("llama"), _family("qwen2")
