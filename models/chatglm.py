"""ChatGLM-6B (v1, GLM with 2-D rotary positions) in Flax linen, computing what the original does.

Per layer, with LN = LayerNorm and alpha = sqrt(2 * 28) for every config (see RESIDUAL_NUM_LAYERS):

    h  = LN_in(x);    x' = alpha * h  + Attention(h)
    h' = LN_post(x'); y  = alpha * h' + dense_4h_to_h(gelu_tanh(dense_h_to_4h(h')))

Attention: `query_key_value` gives per head [q_h, k_h, v_h] (view [heads, 3 * head_dim], split);
2-D RoPE rotates the first half of each head by the position p and the second half by the block
position b (rotate-half layout, inv_freq = 1 / 10000^(2i/d), d = head_dim / 2, rounded to float16
as the original does); scores q.k / sqrt(head_dim), masked with -10000, softmax in float32.
logits = LN_final(x) E^T with the tied word embeddings E.

Positions (p, b) and visibility follow GLM's layout (models/glm_layout.py: bidirectional prompt up
to <sop>, causal after it; left pads excluded). Without attention_mask (the training convention,
right-padded) every token is real. Decoding continues each row at [m, b_last + 1, ...], seeing
every real token before it. The shared blocks are models/blocks.py's; the checkpoint key map and
partition rules are models/chatglm_keys.py.

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

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cgc_lora_jax.models.blocks import (CausalLM, FamilyModule, apply_rope, cache_slots, cached_attention,
                                        init_kv_cache, rope_cos_sin, rope_inv_freq)
from cgc_lora_jax.models.chatglm_keys import IGNORED_KEYS, PAPER_LORA_TARGETS, PARTITION_RULES, key_map
from cgc_lora_jax.models.family_spec import ModelFamily
from cgc_lora_jax.models.glm_layout import glm_layout

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
    return rope_inv_freq(head_dim // 2, 10000.0).astype(np.float16).astype(np.float32)


def rotary_2d(x_bthd: Array, position_ids: Array, inv_freq: np.ndarray) -> Array:
    """First half of each head by position ids (row 0), second half by block positions (row 1),
    each rotate-half RoPE in float32; x's dtype out."""
    halves = jnp.split(x_bthd.astype(jnp.float32), 2, axis=-1)
    rotated = [apply_rope(half, *rope_cos_sin(position_ids[:, row], inv_freq, jnp.float32))
               for row, half in enumerate(halves)]
    return jnp.concatenate(rotated, axis=-1).astype(x_bthd.dtype)


def layer_norm(x: Array, cfg: ChatGLMConfig, param_dtype, name: str) -> Array:
    """LayerNorm `<name>/{scale, bias}` in float32 (two-pass variance, as torch); x's dtype out."""
    norm = nn.LayerNorm(cfg.layernorm_epsilon, jnp.float32, param_dtype, use_fast_variance=False, name=name)
    return norm(x.astype(jnp.float32)).astype(x.dtype)


class GLMAttention(FamilyModule):
    """Self-attention over the current tokens, or over the KV cache they are written into."""

    @nn.compact
    def __call__(self, x_btd, position_ids, visible, adapters, deterministic, layer_cache=None, index=0):
        """x [B, T, D]; visible [B, 1, T, S]; layer_cache None (S = T) or blocks.py's layer cache,
        written from slot `index`. Returns (output [B, T, D], updated layer cache)."""
        cfg, heads, head_dim = self.config, self.config.num_attention_heads, self.config.head_dim
        qkv = self.dense(3 * cfg.hidden_size, True, "query_key_value")(x_btd, adapters, deterministic)
        q, k, v = jnp.split(qkv.reshape(*qkv.shape[:2], heads, 3 * head_dim), 3, axis=-1)  # per head
        inv_freq = rotary_inv_freq(head_dim)
        q, k = rotary_2d(q, position_ids, inv_freq), rotary_2d(k, position_ids, inv_freq)
        # The original scales q before the product (in the compute dtype) and masks with -10000;
        # rotated keys are cached, as the original does.
        q = q / jnp.asarray(math.sqrt(head_dim), q.dtype)
        context, layer_cache = cached_attention(q, k, v, visible[:, 0], layer_cache, index, scale=1.0,
                                                mask_value=MASK_VALUE)
        context = context.reshape(*context.shape[:2], cfg.hidden_size)
        return self.dense(cfg.hidden_size, True, "dense")(context, adapters, deterministic), layer_cache


class GLMMLP(FamilyModule):
    """dense_4h_to_h(gelu_tanh(dense_h_to_4h(x)))."""

    @nn.compact
    def __call__(self, x_btd, adapters, deterministic):
        cfg = self.config
        h = self.dense(cfg.inner_hidden_size, True, "dense_h_to_4h")(x_btd, adapters, deterministic)
        h = jax.nn.gelu(h.astype(jnp.float32), approximate=True).astype(self.dtype)
        return self.dense(cfg.hidden_size, True, "dense_4h_to_h")(h, adapters, deterministic)


class GLMBlock(FamilyModule):
    """h = LN(x); x' = alpha h + Attn(h); h' = LN(x'); y = alpha h' + MLP(h'), alpha = sqrt(56)."""

    @nn.compact
    def __call__(self, x_btd, position_ids, visible, adapters, deterministic, layer_cache=None, index=0):
        cfg, alpha = self.config, math.sqrt(2 * RESIDUAL_NUM_LAYERS)
        attention_input = layer_norm(x_btd, cfg, self.param_dtype, "input_layernorm")
        attention_output, layer_cache = GLMAttention(*self.fields, name="attention")(
            attention_input, position_ids, visible, adapters, deterministic, layer_cache, index
        )
        hidden = attention_input * alpha + attention_output
        mlp_input = layer_norm(hidden, cfg, self.param_dtype, "post_attention_layernorm")
        mlp_output = GLMMLP(*self.fields, name="mlp")(mlp_input, adapters, deterministic)
        return mlp_input * alpha + mlp_output, layer_cache


class GLMTransformer(FamilyModule):
    """word_embeddings -> layers_0..L-1 -> final_layernorm -> tied head; logits float32."""

    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, position_ids, visible, adapters, deterministic, layer_caches=None, index=0):
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
            layer = block(*self.fields, name=f"layers_{i}")
            layer_cache = None if layer_caches is None else layer_caches[i]
            x, layer_cache = layer(x, position_ids, visible, adapters, deterministic, layer_cache, index)
            new_caches.append(layer_cache)
        x = layer_norm(x, cfg, self.param_dtype, "final_layernorm")
        # In the compute dtype, then float32, as the original casts lm_logits before the loss; a
        # float32 output would make the backward read a float32 copy of the whole embedding.
        logits = jnp.einsum("btd,vd->btv", x, embed.embedding.astype(self.dtype)).astype(jnp.float32)
        return logits, None if layer_caches is None else tuple(new_caches)


class ChatGLMForCausalLM(CausalLM):
    """ChatGLM-6B language model with optional CGC-LoRA adapters (contract: models/family_spec.py)."""

    def setup(self):
        super().setup()
        self.transformer = GLMTransformer(*self.fields, self.remat)

    def __call__(self, input_ids, attention_mask=None, task_ids=None, deterministic=True) -> Array:
        layout = glm_layout(input_ids, attention_mask, self.config)
        adapters = self._adapters(task_ids, input_ids.shape[0])
        logits, _ = self.transformer(
            input_ids, layout.position_ids, layout.visible, adapters, deterministic
        )
        return logits

    @nn.nowrap
    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> dict:
        """Empty KV cache (models/blocks.py), K/V in the compute dtype unless `dtype`. Position
        state: mask_position [B] (p of every generated token), block_position [B] (b of the last
        cached token)."""
        cfg = self.config
        if max_length > cfg.max_sequence_length:
            raise ValueError(f"max_length {max_length} > config max_sequence_length "
                             f"{cfg.max_sequence_length}")
        return init_kv_cache(batch_size, max_length, cfg.num_layers, cfg.num_attention_heads, cfg.head_dim,
                             dtype or self.dtype or jnp.float32, ("mask_position", "block_position"))

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
        valid, causal = cache_slots(cache, real)
        key_slots = jnp.arange(valid.shape[1], dtype=jnp.int32)
        visible = causal[None] | (key_slots[None, None, :] < context_slot[:, None, None])
        visible = visible & valid[:, None, :] & real[:, :, None]
        logits, layers = self.transformer(
            input_ids, position_ids, visible[:, None], self._adapters(task_ids, batch), True,
            cache["layers"], index,
        )
        return logits, {
            "index": index + length,
            "valid": valid,
            "layers": layers,
            "mask_position": position_ids[:, 0, -1],
            "block_position": position_ids[:, 1, -1],
        }


build = ChatGLMForCausalLM.build


def is_chatglm_v1(hf: dict) -> bool:
    """ChatGLM-6B's config.json: model_type chatglm with GLM fields, without v2's multi-query."""
    glm_fields = "inner_hidden_size" in hf or "position_encoding_2d" in hf
    return hf.get("model_type") == "chatglm" and glm_fields and "multi_query_attention" not in hf


FAMILY = ModelFamily(
    name="chatglm",
    matches=is_chatglm_v1,
    config_from_hf=ChatGLMConfig.from_hf,
    build=build,
    key_map=key_map,
    ignored_keys=IGNORED_KEYS,
    partition_rules=PARTITION_RULES,
    default_lora_targets=PAPER_LORA_TARGETS,
)
