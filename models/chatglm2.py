"""ChatGLM2-6B / ChatGLM3-6B (one network, one checkpoint layout) in Flax linen, CGC-LoRA ready.

Per block (pre-norm; x [B, T, d]):

    h = x + dense(Attention(RMSNorm(x)))
    y = h + dense_4h_to_h(silu(a) * b),          [a | b] = dense_h_to_4h(RMSNorm(h))
    RMSNorm(x) = w * x / sqrt(mean(x^2) + eps)    (float32 arithmetic, the scale before the cast back)

Attention: [q | k | v] = query_key_value(x) (the one layer with a bias unless add_bias_linear);
q has H heads, k and v have G groups, all of kv_channels = D dims; query head h reads group
h // (H / G). Rotary embedding turns the first D/2 dims of q and k, in interleaved pairs
(x[2i], x[2i+1]), by the angle pos * theta_i, theta_i = 1 / (10000 * rope_ratio) ** (2i / (D/2)),
in float32. Then softmax(q k^T / sqrt(D) + mask) v with a float32 softmax, and
logits = output_layer(RMSNorm(h_L)). The blocks are models/blocks.py's; the checkpoint key map and
partition rules are models/chatglm2_keys.py.

Masks and positions come from the [B, T] left-padding mask alone: positions are 0 on pads and
0..n-1 on the n tokens; a token sees the earlier tokens and never a pad; a pad query sees every
key (as in the original; its output is never used). No mask: plain causal, positions arange(T).

    cfg = ChatGLM2Config.from_hf(json.load(open("config.json")))
    model = ChatGLM2ForCausalLM(cfg, lora=CGCLoRAConfig(num_tasks=4, targets="query_key_value"))
    logits = model.apply({"params": params}, input_ids, attention_mask, task_ids)
    cache = model.init_cache(batch_size, max_length)
    logits, cache = model.apply({"params": params}, prompt_ids, prompt_mask, task_ids,
                                cache=cache, method=model.decode)   # then one token per call
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from cgc_lora_jax.models.blocks import (CausalLM, FamilyModule, RMSNorm, apply_rope, cache_slots, cached_attention,
                                        init_kv_cache, left_pad_positions, rope_cos_sin, rope_inv_freq)
from cgc_lora_jax.models.chatglm2_keys import IGNORED_KEYS, PAPER_LORA_TARGETS, PARTITION_RULES, key_map
from cgc_lora_jax.models.family_spec import ModelFamily

Array = jax.Array
_REQUIRED = (
    "hidden_size", "num_layers", "num_attention_heads", "kv_channels", "ffn_hidden_size",
    "multi_query_attention", "multi_query_group_num", "padded_vocab_size", "layernorm_epsilon",
    "seq_length", "add_qkv_bias", "add_bias_linear", "rmsnorm", "post_layer_norm",
    "apply_residual_connection_post_layernorm", "eos_token_id", "pad_token_id",
)  # fmt: skip
# config.json setting -> (the value this port implements, its default when absent)
_FIXED = {
    "rmsnorm": (True, None),
    "multi_query_attention": (True, None),
    "apply_residual_connection_post_layernorm": (False, None),
    "fp32_residual_connection": (False, False),
    "tie_word_embeddings": (False, False),
}
_UNSET = ("pre_seq_len", "quantization_bit")  # p-tuning prefix and int quantization: not ported


@dataclasses.dataclass(frozen=True)
class ChatGLM2Config:
    """The config.json fields the network uses (names as in config.json)."""

    hidden_size: int  # d: width of the residual stream
    num_layers: int  # number of GLM blocks
    num_attention_heads: int  # H: query heads
    kv_channels: int  # D: width of one head (q, k and v)
    ffn_hidden_size: int  # width of silu(a) * b in the MLP
    multi_query_group_num: int  # G: key/value heads, each serving H / G consecutive query heads
    padded_vocab_size: int  # rows of word_embeddings and columns of output_layer
    layernorm_epsilon: float  # eps of every RMSNorm
    seq_length: int  # context length the model was trained for, in tokens
    add_qkv_bias: bool  # bias on query_key_value
    add_bias_linear: bool  # bias on dense, dense_h_to_4h and dense_4h_to_h (and qkv)
    post_layer_norm: bool  # final RMSNorm (final_layernorm) before output_layer
    eos_token_id: int | tuple[int, ...]  # end-of-sequence id(s)
    pad_token_id: int  # id the tokenizer left-pads with
    rope_ratio: float = 1.0  # rotary base is 10000 * rope_ratio (ChatGLM3-6B-32k: 50)
    hidden_dropout: float = 0.0  # dropout rate on each sublayer output (training only)
    attention_dropout: float = 0.0  # dropout rate on the attention probabilities (training only)
    hf_config: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        h, g, d = self.num_attention_heads, self.multi_query_group_num, self.kv_channels
        if g < 1 or h % g:
            raise ValueError(f"num_attention_heads={h} is no multiple of multi_query_group_num={g}")
        if d % 4:
            raise ValueError(f"kv_channels={d}: rotary pairs on half a head need a multiple of 4")

    @property
    def qkv_bias(self) -> bool:
        return self.add_qkv_bias or self.add_bias_linear

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> ChatGLM2Config:
        missing = [name for name in _REQUIRED if name not in hf]
        if missing:
            raise ValueError(f"{source}: ChatGLM2/3 needs field(s) {missing}, which are missing")
        for name, (wanted, default) in _FIXED.items():
            if hf.get(name, default) != wanted:
                raise ValueError(
                    f"{source}: {name}={hf.get(name, default)!r} is not supported by "
                    f"models/chatglm2.py (it implements {name}={wanted!r} only)"
                )
        for name in _UNSET:
            if hf.get(name):
                raise ValueError(f"{source}: {name}={hf[name]!r} is not supported by this port")
        eos = hf["eos_token_id"]
        fields = {f.name for f in dataclasses.fields(cls)} - {"hf_config", "eos_token_id"}
        return cls(
            **{k: hf[k] for k in fields if k in hf},
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            hf_config=dict(hf),
        )


def allowed_keys(mask_bt: Array, causal_ts: Array, valid_bs: Array, written_s: Array | bool = True) -> Array:
    """allowed[b, t, s] = (causal and slot s holds a real token) or query t is a pad, which sees
    every written slot (the original's get_masks). Without a cache: causal = tril, valid = mask."""
    return (causal_ts[None] & valid_bs[:, None, :]) | (~mask_bt[:, :, None] & written_s)


def rotate_head_half(x_bthd: Array, cos: Array, sin: Array) -> Array:
    """Interleaved RoPE (float32) on the first 2 * cos.shape[-1] dims; the rest pass through."""
    rot = 2 * cos.shape[-1]
    turned = apply_rope(x_bthd[..., :rot].astype(jnp.float32), cos, sin, interleaved=True)
    return jnp.concatenate([turned.astype(x_bthd.dtype), x_bthd[..., rot:]], axis=-1)


def rms_norm(cfg: ChatGLM2Config, param_dtype, name: str) -> RMSNorm:
    """The original's RMSNorm: parameter `scale`, w * n in float32, then cast to x's dtype."""
    return RMSNorm(cfg.layernorm_epsilon, None, param_dtype, "scale", cast_before_scale=False, name=name)


class SelfAttention(FamilyModule):
    """Multi-query attention; with a layer cache it writes this chunk's K/V at `index` first."""

    @nn.compact
    def __call__(self, x, rope, allowed, adapters, deterministic, layer_cache, index):
        cfg = self.config
        h, g, d = cfg.num_attention_heads, cfg.multi_query_group_num, cfg.kv_channels
        b, t = x.shape[:2]
        qkv = self.dense(h * d + 2 * g * d, cfg.qkv_bias, "query_key_value")(x, adapters, deterministic)
        q, k, v = jnp.split(qkv, [h * d, h * d + g * d], axis=-1)
        q = rotate_head_half(q.reshape(b, t, h, d), *rope)
        k = rotate_head_half(k.reshape(b, t, g, d), *rope)
        drop = nn.Dropout(cfg.attention_dropout, name="attention_dropout")
        context, layer_cache = cached_attention(
            q, k, v.reshape(b, t, g, d), allowed, layer_cache, index,
            probs_dropout=lambda p: drop(p, deterministic),
        )
        dense = self.dense(cfg.hidden_size, cfg.add_bias_linear, "dense")
        return dense(context.reshape(b, t, h * d), adapters, deterministic), layer_cache


class MLP(FamilyModule):
    """dense_4h_to_h(silu(a) * b) with [a | b] = dense_h_to_4h(x)."""

    @nn.compact
    def __call__(self, x, adapters, deterministic):
        cfg = self.config
        ab = self.dense(2 * cfg.ffn_hidden_size, cfg.add_bias_linear, "dense_h_to_4h")(x, adapters, deterministic)
        a, b = jnp.split(ab, 2, axis=-1)
        down = self.dense(cfg.hidden_size, cfg.add_bias_linear, "dense_4h_to_h")
        return down(nn.silu(a) * b, adapters, deterministic)


class GLMBlock(FamilyModule):
    """x + Attention(RMSNorm(x)), then + MLP(RMSNorm(.)); returns (hidden, updated layer cache)."""

    @nn.compact
    def __call__(self, hidden, rope, allowed, adapters, layer_cache, index, deterministic):
        cfg = self.config
        drop = nn.Dropout(cfg.hidden_dropout)
        attn, layer_cache = SelfAttention(*self.fields, name="self_attention")(
            rms_norm(cfg, self.param_dtype, "input_layernorm")(hidden), rope, allowed, adapters,
            deterministic, layer_cache, index,
        )
        hidden = hidden + drop(attn, deterministic=deterministic)
        normed = rms_norm(cfg, self.param_dtype, "post_attention_layernorm")(hidden)
        mlp = MLP(*self.fields, name="mlp")(normed, adapters, deterministic)
        return hidden + drop(mlp, deterministic=deterministic), layer_cache


class Embedding(FamilyModule):
    """Token embedding, its own module so the path reads transformer/embedding/word_embeddings."""

    @nn.compact
    def __call__(self, input_ids: Array) -> Array:
        cfg = self.config
        return nn.Embed(
            cfg.padded_vocab_size,
            cfg.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.initializers.normal(0.02),
            name="word_embeddings",
        )(input_ids)


class GLMTransformer(FamilyModule):
    """The blocks and the final RMSNorm; `remat` recomputes each block in the backward pass."""

    remat: bool = False

    @nn.compact
    def __call__(self, hidden, rope, allowed, adapters, layer_caches, index, deterministic):
        cfg = self.config
        # static_argnums counts self as 0: `deterministic` (a Python bool) is argument 7.
        block = nn.remat(GLMBlock, static_argnums=(7,)) if self.remat else GLMBlock
        new_caches = []
        for i in range(cfg.num_layers):
            layer_cache = None if layer_caches is None else layer_caches[i]
            hidden, layer_cache = block(*self.fields, name=f"layers_{i}")(
                hidden, rope, allowed, adapters, layer_cache, index, deterministic
            )
            new_caches.append(layer_cache)
        if cfg.post_layer_norm:
            hidden = rms_norm(cfg, self.param_dtype, "final_layernorm")(hidden)
        return hidden, None if layer_caches is None else tuple(new_caches)


class ChatGLM2Model(FamilyModule):
    """embedding -> encoder -> output_layer, under the checkpoint's "transformer" prefix."""

    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, positions, allowed, adapters, layer_caches, index, deterministic):
        cfg = self.config
        hidden = Embedding(*self.fields, name="embedding")(input_ids)
        rot_dim = cfg.kv_channels // 2
        rope = rope_cos_sin(positions, rope_inv_freq(rot_dim, 10000.0 * cfg.rope_ratio), jnp.float32)
        encoder = GLMTransformer(*self.fields, self.remat, name="encoder")
        hidden, layer_caches = encoder(hidden, rope, allowed, adapters, layer_caches, index, deterministic)
        output_layer = self.dense(cfg.padded_vocab_size, False, "output_layer")
        return output_layer(hidden, adapters, deterministic).astype(jnp.float32), layer_caches


class ChatGLM2ForCausalLM(CausalLM):
    """The model of the module docstring; parameters under "transformer" (and "task_gate")."""

    def setup(self):
        super().setup()
        self.transformer = ChatGLM2Model(*self.fields, self.remat)

    def __call__(self, input_ids, attention_mask=None, task_ids=None, deterministic=True) -> Array:
        mask = _token_mask(input_ids, attention_mask)
        causal = jnp.tril(jnp.ones((mask.shape[1],) * 2, bool))
        logits, _ = self.transformer(
            input_ids, left_pad_positions(mask), allowed_keys(mask, causal, mask),
            self._adapters(task_ids, input_ids.shape[0]), None, 0, deterministic,
        )
        return logits

    def decode(self, input_ids, attention_mask=None, task_ids=None, *, cache: dict):
        """T new tokens per row against the cache -> (logits [B, T, V], updated cache).

        Writes past the cache's max_length are dropped silently: size `init_cache` for the
        prompt plus every new token.
        """
        mask = _token_mask(input_ids, attention_mask)
        index, t = cache["index"], input_ids.shape[1]
        valid, causal = cache_slots(cache, mask)
        written = jnp.arange(valid.shape[1]) < index + t
        logits, layers = self.transformer(
            input_ids, left_pad_positions(mask, cache["next_position"]),
            allowed_keys(mask, causal, valid, written), self._adapters(task_ids, input_ids.shape[0]),
            cache["layers"], index, True,
        )
        return logits, {
            "index": index + t,
            "valid": valid,
            "layers": layers,
            "next_position": cache["next_position"] + jnp.sum(mask, axis=1, dtype=jnp.int32),
        }

    @nn.nowrap
    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> dict:
        """Empty KV cache (models/blocks.py), K/V in the compute dtype unless `dtype`; position
        state: next_position [B], the rotary position of each row's next token."""
        cfg = self.config
        return init_kv_cache(batch_size, max_length, cfg.num_layers, cfg.multi_query_group_num,
                             cfg.kv_channels, dtype or self.dtype or jnp.float32, ("next_position",))


def _token_mask(input_ids: Array, attention_mask: Array | None) -> Array:
    if attention_mask is None:
        return jnp.ones(input_ids.shape, bool)
    return attention_mask.astype(bool)


build = ChatGLM2ForCausalLM.build


def matches(hf_config: dict) -> bool:
    """ChatGLM2-6B and ChatGLM3-6B: model_type "chatglm" with the v2 fields (v1 has neither)."""
    return hf_config.get("model_type") == "chatglm" and (
        "multi_query_attention" in hf_config or "padded_vocab_size" in hf_config
    )


FAMILY = ModelFamily(
    name="chatglm2",
    matches=matches,
    config_from_hf=ChatGLM2Config.from_hf,
    build=build,
    key_map=key_map,
    ignored_keys=IGNORED_KEYS,
    partition_rules=PARTITION_RULES,
    default_lora_targets=PAPER_LORA_TARGETS,
)
