"""Target-token cross-entropy through a frozen head == the full-logits loss, values and gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cgc_lora_jax.layers import CGCLoRAConfig
from cgc_lora_jax.params import join_params, split_params
from cgc_lora_jax.target_loss import target_token_sums
from cgc_lora_jax.loss import IGNORE, token_losses
from cgc_lora_jax.training.step import example_sums
from cgc_lora_jax.models.llama import LlamaConfig, LlamaForCausalLM

B, T, D, V = 3, 11, 8, 50


def labels_with_gaps(seed=0):
    """Prompt (ignored) + target + right padding (ignored) rows, and a row without any target."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, V, (B, T))
    labels[0, :4] = IGNORE
    labels[1, :2], labels[1, 8:] = IGNORE, IGNORE
    labels[2, :] = IGNORE
    return jnp.asarray(labels)


def full_logits_sums(hidden, head, labels):
    logits = jnp.einsum("btd,vd->btv", hidden, head)
    nll, mask = token_losses(logits, labels)
    return nll.sum(axis=1), mask.sum(axis=1).astype(jnp.float32)


@pytest.mark.parametrize("chunk", [4, 7, 64])  # several chunks (some skipped), ragged, one chunk
def test_sums_and_gradient_equal_the_full_logits(chunk):
    hidden = jax.random.normal(jax.random.key(0), (B, T, D))
    head = jax.random.normal(jax.random.key(1), (V, D))
    labels = labels_with_gaps()
    got, got_counts = target_token_sums(hidden, head, labels, chunk)
    want, want_counts = full_logits_sums(hidden, head, labels)
    np.testing.assert_array_equal(got_counts, want_counts)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert float(got[2]) == 0.0

    # Gradient of the token-mean loss with per-example weights, so the cotangent is not uniform.
    weights = jnp.asarray([1.0, 3.0, 2.0])
    loss = lambda fn: lambda h: jnp.sum(weights * fn(h, head, labels)[0]) / want_counts.sum()
    g_got = jax.grad(loss(lambda h, w, y: target_token_sums(h, w, y, chunk)))(hidden)
    g_want = jax.grad(loss(full_logits_sums))(hidden)
    np.testing.assert_allclose(g_got, g_want, rtol=1e-5, atol=1e-7)
    # The head is frozen: its gradient is defined as zero.
    g_head = jax.grad(lambda w: target_token_sums(hidden, w, labels, chunk)[0].sum())(head)
    assert not np.any(np.asarray(g_head))


def tiny_llama(tied: bool, targets="q_proj|v_proj|lm_head"):
    cfg = LlamaConfig.from_hf(dict(model_type="llama", vocab_size=V, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   rms_norm_eps=1e-5, tie_word_embeddings=tied))
    model = LlamaForCausalLM(cfg, lora=CGCLoRAConfig(3, num_common=2, common_rank=2, specific_rank=2,
                                                     targets=targets))
    ids = jax.random.randint(jax.random.key(2), (B, T), 0, V)
    task_ids = jnp.asarray([0, 2, 1])
    params = model.init(jax.random.key(3), ids, None, task_ids)["params"]
    # Nonzero B, so the adapters change the loss and receive a gradient through every layer.
    flat = {p: (jax.random.normal(jax.random.key(len(p)), x.shape) * 0.1 if p[-1] == "B" else x)
            for p, x in traverse_util.flatten_dict(params).items()}
    base, adapters = split_params(traverse_util.unflatten_dict(flat))
    return model, base, adapters, {"input_ids": ids, "labels": labels_with_gaps(1), "task_ids": task_ids}


@pytest.mark.parametrize("tied", [True, False])
def test_llama_loss_and_adapter_gradients_equal_the_full_logits_path(tied):
    model, base, adapters, batch = tiny_llama(tied, targets="q_proj|v_proj|down_proj")
    assert model.frozen_head(join_params(base, adapters)) is not None

    def loss(adapters, full: bool):
        params = join_params(base, adapters)
        if full:
            logits = model.apply({"params": params}, batch["input_ids"], None, batch["task_ids"])
            nll, mask = token_losses(logits, batch["labels"])
            return nll.sum() / mask.sum()
        per_example, counts = example_sums(model, params, batch, None, True)
        return per_example.sum() / counts.sum()

    (l_fast, g_fast), (l_full, g_full) = (jax.jit(jax.value_and_grad(loss), static_argnums=1)(adapters, full)
                                          for full in (False, True))
    np.testing.assert_allclose(l_fast, l_full, rtol=1e-6)
    for path, a in traverse_util.flatten_dict(g_fast).items():
        b = traverse_util.flatten_dict(g_full)[path]
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5 * np.abs(np.asarray(b)).max(), path


def test_adapted_lm_head_falls_back_to_full_logits():
    model, base, adapters, _ = tiny_llama(tied=False)
    assert "lora" in adapters["lm_head"]
    assert model.frozen_head(join_params(base, adapters)) is None
    tied_model = dataclasses.replace(model, config=dataclasses.replace(model.config, tie_word_embeddings=True))
    assert tied_model.frozen_head(join_params(base, adapters)) is base["model"]["embed_tokens"]["embedding"]
