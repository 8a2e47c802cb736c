"""ChatGLM-6B (v1, GLM with 2-D rotary positions) in Flax linen, computing what the original does.

Per layer, with LN = LayerNorm and alpha = sqrt(2 * 28) for every config (see RESIDUAL_NUM_LAYERS):

    h  = LN_in(x);    x' = alpha * h  + Attention(h)
    h' = LN_post(x'); y  = alpha * h' + dense_4h_to_h(gelu_tanh(dense_h_to_4h(h')))

Attention: `query_key_value` gives per head [q_h, k_h, v_h] (view [heads, 3 * head_dim], split);
2-D RoPE rotates the first half of each head by the position p and the second half by the block
position b (rotate-half layout, inv_freq = 1 / 10000^(2i/d), d = head_dim / 2, rounded to float16
as the original does); scores q.k / sqrt(head_dim), masked with -10000, softmax in float32.
logits = LN_final(x) E^T with the tied word embeddings E.

GLM layout of one unpadded prompt of n tokens, `text + [gMASK] + <sop> + ...`:
    context_length c = index of <sop> (bos), n if absent;
    mask position m = index of [MASK] if present, else of [gMASK] (the tokenizer's rule; the
        original model's own fallback prefers [gMASK] when a row holds both);
    p = 0, 1, ..., c-1, m, m, ... (0, 1, ..., n-1 without a mask token);
    b = 0, ..., 0, 1, 2, ... (b = 1 at <sop>);
    query i sees key j iff j <= i or j < c (bidirectional prompt, causal from <sop> on).
Left pads (attention_mask 0) get p = b = 0 and are never seen; their own rows see nothing.
Without attention_mask (the training convention, right-padded) every token is real.
Decoding continues each row at [m, b_last + 1, ...], seeing every real token before it.

    cfg = ChatGLMConfig.from_hf(json.load(open("config.json")))
    model = ChatGLMForCausalLM(cfg, lora=CGCLoRAConfig(num_tasks=4, targets="query_key_value"))
    logits = model.apply({"params": params}, input_ids, attention_mask, task_ids)
    cache = model.init_cache(batch_size, max_length)
    logits, cache = model.apply({"params": params}, input_ids, attention_mask, task_ids,
                                cache=cache, method=model.decode)   # prompt, then one token a call
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec as P

from cgc_lora_jax.layers import AdapterInputs, CGCLoRAConfig, Dense, TaskRouting
from cgc_lora_jax.sharding import ADAPTER_RULES
from cgc_lora_jax.models.family import KeyMap, ModelFamily, register

Array = jax.Array
MASK_VALUE = -10000.0  # the original's masked_fill value (not -inf: fully masked pad rows stay finite)
# The residual scale is sqrt(2 * 28) for every config: the original GLMBlock's num_layers argument
# defaults to 28 and ChatGLMModel never passes config.num_layers (they agree for the 6B model only).
RESIDUAL_NUM_LAYERS = 28


@dataclasses.dataclass(frozen=True)
class ChatGLMConfig:
    """The config.json fields ChatGLM-6B needs; `hf_config` keeps the raw dict for saving."""

    vocab_size: int  # rows of the (tied) word embeddings
    hidden_size: int  # model width
    num_layers: int  # GLM blocks
    num_attention_heads: int  # heads; head_dim = hidden_size / heads
    inner_hidden_size: int  # MLP width
    layernorm_epsilon: float  # LayerNorm eps
    max_sequence_length: int  # longest sequence (prompt + generation) the model was built for
    bos_token_id: int  # <sop>: starts the causal block
    eos_token_id: int  # <eop>
    mask_token_id: int  # [MASK]
    gmask_token_id: int  # [gMASK]
    pad_token_id: int  # <pad>
    position_encoding_2d: bool  # 2-D RoPE (every released ChatGLM-6B checkpoint)
    hf_config: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> ChatGLMConfig:
        fields = [f.name for f in dataclasses.fields(cls) if f.name != "hf_config"]
        for name in fields:
            if name not in hf:
                raise ValueError(f"{source}: missing field {name!r}, which ChatGLM-6B needs")
        cfg = cls(**{name: hf[name] for name in fields}, hf_config=dict(hf))
        if not cfg.position_encoding_2d:
            raise ValueError(f"{source}: position_encoding_2d=false (1-D GLM) is not supported")
        if cfg.hidden_size % cfg.num_attention_heads or cfg.head_dim % 4:
            raise ValueError(f"{source}: hidden_size / num_attention_heads must be a multiple of 4")
        return cfg


def rotary_inv_freq(head_dim: int) -> np.ndarray:
    """inv_freq of the 2-D RoPE halves (d = head_dim / 2), rounded to float16 like the original."""
    d = head_dim // 2
    exponent = np.arange(0, d, 2, dtype=np.float32) / np.float32(d)
    inv_freq = np.float32(1.0) / np.float32(10000.0) ** exponent
    return inv_freq.astype(np.float16).astype(np.float32)


def rotate(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
    """Rotate-half RoPE: x cos(p f) + [-x2, x1] sin(p f); x [B, T, H, d], positions [B, T]."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, d/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    x = x.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * jnp.cos(angles) + jnp.concatenate([-x2, x1], axis=-1) * jnp.sin(angles)


def rotary_2d(x_bthd: Array, position_ids: Array, inv_freq: np.ndarray) -> Array:
    """First half of each head by position ids (row 0), second half by block positions (row 1)."""
    first, second = jnp.split(x_bthd, 2, axis=-1)
    first = rotate(first, position_ids[:, 0], inv_freq)
    second = rotate(second, position_ids[:, 1], inv_freq)
    return jnp.concatenate([first, second], axis=-1).astype(x_bthd.dtype)


@struct.dataclass
class GLMLayout:
    """Positions and visibility of a (left-padded) prompt, as the original tokenizer builds them."""

    position_ids: Array  # [B, 2, T] int32: rows (p, b)
    visible: Array  # [B, 1, T, T] bool: query t sees key s (the original's mask is ~visible)
    context_slot: Array  # [B] int32: index of <sop> in the padded row (T if absent)


def glm_layout(input_ids: Array, attention_mask: Array | None, cfg: ChatGLMConfig) -> GLMLayout:
    """Module docstring's layout, per row, with left pads (attention_mask 0) excluded."""
    batch, length = input_ids.shape
    real = jnp.ones((batch, length), bool) if attention_mask is None else attention_mask.astype(bool)
    real_index = jnp.cumsum(real, axis=1, dtype=jnp.int32) - 1  # index among the row's real tokens
    slots = jnp.arange(length, dtype=jnp.int32)

    def first(token_id):  # (present?, slot of the first real occurrence)
        hit = (input_ids == token_id) & real
        return hit.any(axis=1), jnp.argmax(hit, axis=1).astype(jnp.int32)

    has_bos, bos_slot = first(cfg.bos_token_id)
    has_mask, mask_slot = first(cfg.mask_token_id)
    has_gmask, gmask_slot = first(cfg.gmask_token_id)
    context_slot = jnp.where(has_bos, bos_slot, length)
    mask_slot = jnp.where(has_mask, mask_slot, gmask_slot)
    mask_position = jnp.take_along_axis(real_index, mask_slot[:, None], axis=1)
    bos_index = jnp.take_along_axis(real_index, bos_slot[:, None], axis=1)  # c, where <sop> exists

    in_block = real & (slots[None, :] >= context_slot[:, None])
    positions = jnp.where(real, real_index, 0)
    positions = jnp.where(in_block & (has_mask | has_gmask)[:, None], mask_position, positions)
    block_positions = jnp.where(in_block, real_index - bos_index + 1, 0)

    causal = slots[None, :, None] >= slots[None, None, :]
    in_context = slots[None, None, :] < context_slot[:, None, None]
    visible = (causal | in_context) & real[:, :, None] & real[:, None, :]
    return GLMLayout(
        position_ids=jnp.stack([positions, block_positions], axis=1),
        visible=visible[:, None],
        context_slot=context_slot,
    )


def layer_norm(x: Array, cfg: ChatGLMConfig, param_dtype, name: str) -> Array:
    """LayerNorm `<name>/{scale, bias}` in float32 (two-pass variance, as torch); x's dtype out."""
    norm = nn.LayerNorm(cfg.layernorm_epsilon, jnp.float32, param_dtype, use_fast_variance=False, name=name)
    return norm(x.astype(jnp.float32)).astype(x.dtype)


class GLMAttention(nn.Module):
    """Self-attention over the current tokens, or over the KV cache they are written into."""

    config: ChatGLMConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: CGCLoRAConfig | None = None

    @nn.compact
    def __call__(self, x_btd, position_ids, visible, adapters, deterministic, kv_cache=None):
        """x [B, T, D]; visible [B, 1, T, S]; kv_cache None (S = T) or (key, value, write index)
        with key/value [B, S, heads, head_dim]. Returns (output [B, T, D], updated (key, value))."""
        cfg, heads, head_dim = self.config, self.config.num_attention_heads, self.config.head_dim
        kw = dict(lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = Dense(3 * cfg.hidden_size, name="query_key_value", **kw)(x_btd, adapters, deterministic)
        q, k, v = jnp.split(qkv.reshape(*qkv.shape[:2], heads, 3 * head_dim), 3, axis=-1)  # per head
        inv_freq = rotary_inv_freq(head_dim)
        q, k = rotary_2d(q, position_ids, inv_freq), rotary_2d(k, position_ids, inv_freq)
        if kv_cache is not None:
            key_cache, value_cache, index = kv_cache  # rotated keys are cached, as the original
            k = jax.lax.dynamic_update_slice(key_cache, k.astype(key_cache.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(value_cache, v.astype(value_cache.dtype), (0, index, 0, 0))
            kv_cache = (k, v)
        f32 = jnp.float32
        q = q / jnp.asarray(math.sqrt(head_dim), q.dtype)
        scores = jnp.einsum("bthd,bshd->bhts", q, k.astype(q.dtype), preferred_element_type=f32)
        probs = jax.nn.softmax(jnp.where(visible, scores, MASK_VALUE), axis=-1).astype(self.dtype)
        context = jnp.einsum("bhts,bshd->bthd", probs, v.astype(self.dtype), preferred_element_type=f32)
        context = context.reshape(*context.shape[:2], cfg.hidden_size).astype(self.dtype)
        output = Dense(cfg.hidden_size, name="dense", **kw)(context, adapters, deterministic)
        return output, kv_cache


class GLMMLP(nn.Module):
    """dense_4h_to_h(gelu_tanh(dense_h_to_4h(x)))."""

    config: ChatGLMConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: CGCLoRAConfig | None = None

    @nn.compact
    def __call__(self, x_btd, adapters, deterministic):
        cfg, kw = self.config, dict(lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype)
        h = Dense(cfg.inner_hidden_size, name="dense_h_to_4h", **kw)(x_btd, adapters, deterministic)
        h = jax.nn.gelu(h.astype(jnp.float32), approximate=True).astype(self.dtype)
        return Dense(cfg.hidden_size, name="dense_4h_to_h", **kw)(h, adapters, deterministic)


class GLMBlock(nn.Module):
    """h = LN(x); x' = alpha h + Attn(h); h' = LN(x'); y = alpha h' + MLP(h'), alpha = sqrt(56)."""

    config: ChatGLMConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: CGCLoRAConfig | None = None

    @nn.compact
    def __call__(self, x_btd, position_ids, visible, adapters, deterministic, kv_cache=None):
        cfg, alpha = self.config, math.sqrt(2 * RESIDUAL_NUM_LAYERS)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
        attention_input = layer_norm(x_btd, cfg, self.param_dtype, "input_layernorm")
        attention_output, kv_cache = GLMAttention(cfg, name="attention", **kw)(
            attention_input, position_ids, visible, adapters, deterministic, kv_cache
        )
        hidden = attention_input * alpha + attention_output
        mlp_input = layer_norm(hidden, cfg, self.param_dtype, "post_attention_layernorm")
        mlp_output = GLMMLP(cfg, name="mlp", **kw)(mlp_input, adapters, deterministic)
        return mlp_input * alpha + mlp_output, kv_cache


class GLMTransformer(nn.Module):
    """word_embeddings -> layers_0..L-1 -> final_layernorm -> tied head; logits float32."""

    config: ChatGLMConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: CGCLoRAConfig | None = None
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, position_ids, visible, adapters, deterministic, kv_caches=None):
        cfg = self.config
        embed = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=nn.initializers.normal(0.02), name="word_embeddings",
        )
        x = embed(input_ids)
        # deterministic (argument 5, counting self) is a Python bool: static under remat.
        block = nn.remat(GLMBlock, static_argnums=(5,)) if self.remat else GLMBlock
        new_caches = []
        for i in range(cfg.num_layers):
            layer = block(cfg, self.dtype, self.param_dtype, self.lora, name=f"layers_{i}")
            kv = None if kv_caches is None else kv_caches[i]
            x, kv = layer(x, position_ids, visible, adapters, deterministic, kv)
            new_caches.append(kv)
        x = layer_norm(x, cfg, self.param_dtype, "final_layernorm")
        # In the compute dtype, then float32, as the original casts lm_logits before the loss; a
        # float32 output would make the backward read a float32 copy of the whole embedding.
        logits = jnp.einsum("btd,vd->btv", x, embed.embedding.astype(self.dtype)).astype(jnp.float32)
        return logits, None if kv_caches is None else new_caches


class ChatGLMForCausalLM(nn.Module):
    """ChatGLM-6B language model with optional CGC-LoRA adapters (contract: models/family.py)."""

    config: ChatGLMConfig
    dtype: Any = jnp.float32  # activation / matmul dtype (softmax, norms and logits in float32)
    param_dtype: Any = jnp.float32
    lora: CGCLoRAConfig | None = None
    remat: bool = False  # rematerialise each block in the backward pass

    def setup(self):
        self.transformer = GLMTransformer(
            self.config, self.dtype, self.param_dtype, self.lora, self.remat
        )
        if self.lora is not None:
            self.task_gate = TaskRouting(self.lora)

    def _adapters(self, task_ids, batch_size: int) -> AdapterInputs | None:
        return None if self.lora is None else self.task_gate(task_ids, batch_size)

    def __call__(self, input_ids, attention_mask=None, task_ids=None, deterministic=True) -> Array:
        layout = glm_layout(input_ids, attention_mask, self.config)
        adapters = self._adapters(task_ids, input_ids.shape[0])
        logits, _ = self.transformer(
            input_ids, layout.position_ids, layout.visible, adapters, deterministic
        )
        return logits

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> dict:
        """Empty KV cache: per layer key/value [B, max_length, heads, head_dim], the next write
        slot `index`, which slots hold real tokens (`valid`), and each row's last position pair."""
        dtype = dtype or self.dtype or jnp.float32  # the cache holds K/V in the compute dtype
        cfg = self.config
        if max_length > cfg.max_sequence_length:
            raise ValueError(f"max_length {max_length} > config max_sequence_length "
                             f"{cfg.max_sequence_length}")
        shape = (batch_size, max_length, cfg.num_attention_heads, cfg.head_dim)
        return {
            "key": [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
            "value": [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
            "index": jnp.zeros((), jnp.int32),
            "valid": jnp.zeros((batch_size, max_length), bool),
            "mask_position": jnp.zeros((batch_size,), jnp.int32),  # p of every generated token
            "block_position": jnp.zeros((batch_size,), jnp.int32),  # b of the last cached token
        }

    def decode(self, input_ids, attention_mask=None, task_ids=None, *, cache: dict):
        """Write input_ids [B, T] at cache slots index..index+T-1 and return (logits, cache).

        At index 0 (the prompt) positions and visibility follow `glm_layout`; later tokens get
        p = the row's mask position, b = last b + 1, 2, ... and see every valid slot up to their
        own. The caller keeps index + T <= max_length (slices past the end are clamped by XLA).
        """
        batch, length = input_ids.shape
        index = cache["index"]
        real = jnp.ones((batch, length), bool)
        real = real if attention_mask is None else attention_mask.astype(bool)
        prompt = glm_layout(input_ids, real, self.config)
        is_prompt = index == 0
        continued = jnp.stack([
            jnp.broadcast_to(cache["mask_position"][:, None], (batch, length)),
            cache["block_position"][:, None] + jnp.arange(1, length + 1, dtype=jnp.int32),
        ], axis=1)
        position_ids = jnp.where(is_prompt, prompt.position_ids, continued)
        context_slot = jnp.where(is_prompt, prompt.context_slot, 0)  # bidirectional: prompt only
        valid = jax.lax.dynamic_update_slice(cache["valid"], real, (0, index))
        query_slots = index + jnp.arange(length, dtype=jnp.int32)
        key_slots = jnp.arange(valid.shape[1], dtype=jnp.int32)
        visible = (key_slots[None, None, :] <= query_slots[None, :, None]) | (
            key_slots[None, None, :] < context_slot[:, None, None]
        )
        visible = visible & valid[:, None, :] & real[:, :, None]
        kv_caches = [(k, v, index) for k, v in zip(cache["key"], cache["value"])]
        logits, kv_caches = self.transformer(
            input_ids, position_ids, visible[:, None], self._adapters(task_ids, batch), True, kv_caches
        )
        return logits, {
            "key": [k for k, _ in kv_caches],
            "value": [v for _, v in kv_caches],
            "index": index + length,
            "valid": valid,
            "mask_position": position_ids[:, 0, -1],
            "block_position": position_ids[:, 1, -1],
        }


def key_map(cfg: ChatGLMConfig) -> KeyMap:
    """HF tensor name -> (Flax path, transpose?): torch Linear [out, in] -> Flax kernel [in, out]."""
    top = ("transformer",)
    mapping = {
        "transformer.word_embeddings.weight": (top + ("word_embeddings", "embedding"), False),
        # Tied: the loader checks that lm_head equals the embedding and the saver writes both, so
        # a checkpoint with an untied head is refused instead of silently loading wrong.
        "lm_head.weight": (top + ("word_embeddings", "embedding"), False),
        "transformer.final_layernorm.weight": (top + ("final_layernorm", "scale"), False),
        "transformer.final_layernorm.bias": (top + ("final_layernorm", "bias"), False),
    }
    for i in range(cfg.num_layers):
        hf, flax_path = f"transformer.layers.{i}", top + (f"layers_{i}",)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            mapping[f"{hf}.{norm}.weight"] = (flax_path + (norm, "scale"), False)
            mapping[f"{hf}.{norm}.bias"] = (flax_path + (norm, "bias"), False)
        for parent, dense in (
            ("attention", "query_key_value"), ("attention", "dense"),
            ("mlp", "dense_h_to_4h"), ("mlp", "dense_4h_to_h"),
        ):
            mapping[f"{hf}.{parent}.{dense}.weight"] = (flax_path + (parent, dense, "kernel"), True)
            mapping[f"{hf}.{parent}.{dense}.bias"] = (flax_path + (parent, dense, "bias"), False)
    return mapping


def build(config: ChatGLMConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
          lora: CGCLoRAConfig | None = None, remat: bool = False) -> ChatGLMForCausalLM:
    return ChatGLMForCausalLM(config, dtype=dtype, param_dtype=param_dtype, lora=lora, remat=remat)


def is_chatglm_v1(hf: dict) -> bool:
    """ChatGLM-6B's config.json: model_type chatglm with GLM fields, without v2's multi-query."""
    glm_fields = "inner_hidden_size" in hf or "position_encoding_2d" in hf
    return hf.get("model_type") == "chatglm" and glm_fields and "multi_query_attention" not in hf


# The paper's adapted layers: every dense layer of the blocks (attention qkv + output, both MLP layers).
PAPER_LORA_TARGETS = r"(query_key_value|dense|dense_h_to_4h|dense_4h_to_h)$"

PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"word_embeddings/embedding$", P("tensor", "fsdp")),  # vocab over tensor
    (r"(query_key_value|dense_h_to_4h)/kernel$", P("fsdp", "tensor")),  # column-parallel
    (r"(query_key_value|dense_h_to_4h)/bias$", P("tensor")),
    (r"(attention/dense|dense_4h_to_h)/kernel$", P("tensor", "fsdp")),  # row-parallel
    (r"(attention/dense|dense_4h_to_h)/bias$", P()),
    (r"layernorm/(scale|bias)$", P()),
    *ADAPTER_RULES,
    (r".*", P()),
)

FAMILY = register(
    ModelFamily(
        name="chatglm",
        matches=is_chatglm_v1,
        config_from_hf=ChatGLMConfig.from_hf,
        build=build,
        key_map=key_map,
        # The model derives inv_freq itself.
        ignored_keys=r"^transformer\.layers\.\d+\.attention\.rotary_emb\.inv_freq$",
        partition_rules=PARTITION_RULES,
        default_lora_targets=PAPER_LORA_TARGETS,
    )
)
