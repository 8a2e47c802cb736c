"""Jit-compiled generation for any model family that follows the decode contract of models/family.py.

One compiled program per (model, prompt bucket, batch size, max_new_tokens, number of eos ids,
pad id, do_sample): it prefills the KV cache with the prompt and runs a `jax.lax.while_loop` over decode
steps, so no step recompiles and the loop ends as soon as every row has emitted an eos.

Prompt buckets: the prompt is left-padded (pad_token_id, attention_mask 0) to the next bucket, a
power of two or one and a half times one, at least `MIN_PROMPT_BUCKET` (16, 24, 32, 48, 64, 96, ...):
prompts of 5 and 7 tokens share the 16-token program, 33 to 48 tokens the 48-token one. A prompt
pays for at most a third more positions than it has (a power-of-two ladder alone: up to twice), at
the price of at most twice the programs. Every family derives positions from the attention mask and masks padded keys, so
the extra left padding does not change the result.

Token choice at each step, from the last position's logits l [B, V] (float32):

    greedy:   argmax_v l
    sampling: l / temperature -> keep the top_k largest (0: all) -> keep the smallest set of most
              likely tokens whose probability reaches top_p (1.0: all) -> draw from softmax

the same order as transformers' logits warpers. Rows that have emitted an eos get pad_token_id
afterwards. eos ids, temperature, top_p and top_k are traced values: changing them does not
recompile.

    new_ids = generate(model, params, input_ids, attention_mask, task_ids,
                       max_new_tokens=64, eos_token_id=2, pad_token_id=0)       # [B, 64]

Adapters need nothing special: task_ids [B] go to every decode call (mixed-task batches are fused),
and merged per-task weights are just other params.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
MIN_PROMPT_BUCKET = 16  # shortest prompt bucket, in tokens


def prompt_bucket(length: int) -> int:
    """The padded prompt length: the smallest 2^k or 3 * 2^(k-1) >= length, at least MIN_PROMPT_BUCKET."""
    power = 1 << max(length - 1, 0).bit_length()  # the next power of two >= length
    return max(MIN_PROMPT_BUCKET, 3 * power // 4 if 3 * power // 4 >= length else power)


def left_pad(input_ids, attention_mask, length: int, pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Prepend pads (mask 0) so both arrays are [B, length]."""
    input_ids, attention_mask = np.asarray(input_ids), np.asarray(attention_mask)
    extra = length - input_ids.shape[1]
    input_ids = np.pad(input_ids, ((0, 0), (extra, 0)), constant_values=pad_token_id)
    attention_mask = np.pad(attention_mask, ((0, 0), (extra, 0)), constant_values=0)
    return input_ids.astype(np.int32), attention_mask.astype(np.int32)


def filter_logits(logits: Array, top_k: Array, top_p: Array) -> Array:
    """Set to -inf every logit outside the top_k (0: no limit) and outside the top_p nucleus.

    Nucleus: sorted by probability, token i stays when the mass of the tokens before it is
    < top_p, so the most likely token always stays and top_p = 1 keeps everything.
    """
    vocab = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth_value = jax.lax.dynamic_index_in_dim(sorted_desc, k - 1, axis=-1, keepdims=True)
    sorted_desc = jnp.where(sorted_desc >= kth_value, sorted_desc, -jnp.inf)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = (mass_before < top_p) | (top_p >= 1.0)
    cutoff = jnp.min(jnp.where(keep_sorted, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= jnp.maximum(cutoff, kth_value), logits, -jnp.inf)


def greedy_tokens(logits: Array) -> Array:
    """argmax over the last axis (the first of equal maxima), as two plain reductions: the max, then
    the smallest index holding it. XLA:CPU runs jnp.argmax's (value, index) reduction unvectorised,
    3.4 ms a step over [32, 49152] logits, about 4% of a SmolLM2 decode step. A row of NaNs gives
    the last id rather than jnp.argmax's index of the NaN."""
    vocab = logits.shape[-1]
    best = jnp.max(logits, axis=-1, keepdims=True)
    index = jnp.min(jnp.where(logits == best, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)
    return jnp.minimum(index, vocab - 1)


def choose_tokens(logits: Array, rng: Array, do_sample: bool, temperature, top_k, top_p) -> Array:
    """Next token per row [B] int32 from last-position logits [B, V]."""
    if not do_sample:
        return greedy_tokens(logits)
    filtered = filter_logits(logits.astype(jnp.float32) / temperature, top_k, top_p)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "pad_token_id", "do_sample"))
def _generate(model, params, input_ids, attention_mask, task_ids, eos_ids, rng, temperature, top_k, top_p, *,
              max_new_tokens: int, pad_token_id: int, do_sample: bool) -> Array:
    batch, prompt_length = input_ids.shape
    variables = {"params": params}

    # A family whose decode takes `last_only` skips the head on all but the last prompt position.
    last_only = {"last_only": True} if "last_only" in inspect.signature(model.decode).parameters else {}

    def step(token_ids, mask, cache):
        logits, cache = model.apply(variables, token_ids, mask, task_ids, cache=cache, method=model.decode,
                                    **last_only)
        return logits[:, -1], cache

    def pick(logits, rng, done):
        rng, sub = jax.random.split(rng)
        tokens = choose_tokens(logits, sub, do_sample, temperature, top_k, top_p)
        tokens = jnp.where(done, pad_token_id, tokens)
        return tokens, done | jnp.isin(tokens, eos_ids), rng

    # The index as the Python int 0 tells attention at trace time that the cache is empty, so the
    # prompt attends over its own keys alone (models/blocks.py: cached_attention).
    cache = {**model.init_cache(batch, prompt_length + max_new_tokens), "index": 0}
    logits, cache = step(input_ids, attention_mask, cache)
    cache = {**cache, "index": jnp.asarray(cache["index"], jnp.int32)}
    tokens, done, rng = pick(logits, rng, jnp.zeros((batch,), bool))
    out = jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(tokens)

    def cond(state):
        i, _, done, _, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tokens, done, cache, out, rng = state
        logits, cache = step(tokens[:, None], jnp.ones((batch, 1), jnp.int32), cache)
        tokens, done, rng = pick(logits, rng, done)
        out = jax.lax.dynamic_update_slice(out, tokens[:, None], (0, i))
        return i + 1, tokens, done, cache, out, rng

    state = (jnp.asarray(1, jnp.int32), tokens, done, cache, out, rng)
    return jax.lax.while_loop(cond, body, state)[4]


def generate(
    model: Any,
    params: Any,
    input_ids,
    attention_mask=None,
    task_ids=None,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    rng: Array | None = None,
) -> Array:
    """New token ids [B, max_new_tokens] after left-padded prompts input_ids [B, T].

    params: the model's "params" collection. eos_token_id: one id, several, or None (never stop).
    Rows that emitted an eos continue with pad_token_id; sampling needs `rng` (a jax PRNG key).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: need at least 1")
    if do_sample and rng is None:
        raise ValueError("do_sample=True needs rng (e.g. jax.random.key(0))")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature={temperature}: must be > 0 when sampling")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p}: must be in (0, 1]")
    input_ids = np.asarray(input_ids)
    if attention_mask is None:
        attention_mask = np.ones_like(input_ids)
    input_ids, attention_mask = left_pad(
        input_ids, attention_mask, prompt_bucket(input_ids.shape[1]), pad_token_id
    )
    # -1 matches no token: "never stop" shares the program of one eos id.
    eos_ids = [-1] if eos_token_id is None else np.atleast_1d(eos_token_id).tolist() or [-1]
    return _generate(
        model,
        params,
        jnp.asarray(input_ids),
        jnp.asarray(attention_mask),
        None if task_ids is None else jnp.asarray(task_ids, jnp.int32),
        jnp.asarray(eos_ids, jnp.int32),
        jax.random.key(0) if rng is None else rng,
        jnp.asarray(temperature, jnp.float32),
        jnp.asarray(top_k, jnp.int32),
        jnp.asarray(top_p, jnp.float32),
        max_new_tokens=max_new_tokens,
        pad_token_id=int(pad_token_id),
        do_sample=bool(do_sample),
    )
