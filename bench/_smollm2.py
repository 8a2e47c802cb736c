"""SmolLM2-135M shapes with random weights, the same in transformers and in our Llama family.

The real base (HuggingFaceTB/SmolLM2-135M-Instruct) is a Llama: 30 blocks, width 576, MLP 1536,
9 query heads and 3 K/V heads of width 64, vocabulary 49152, tied embeddings, RoPE theta 1e5,
RMSNorm eps 1e-5. The benchmarks only need its shapes, so the weights are transformers' random
init (seeded), copied into our parameter tree by the family's key map:

    hf_model, cfg, base = random_smollm2()      # torch float32 model, LlamaConfig, Flax params
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cgc_lora_jax.models import llama

SMOLLM2_135M = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192, hidden_act="silu",
                    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def to_flax(torch_model, cfg: llama.LlamaConfig, dtype=jnp.float32) -> dict:
    """Our parameter tree from a transformers Llama's state dict (explicit key map and transposes)."""
    state = torch_model.state_dict()
    flat = {path: jnp.asarray(np.ascontiguousarray(state[name].float().numpy().T if transpose
                                                   else state[name].float().numpy()), dtype)
            for name, (path, transpose) in llama.key_map(cfg).items()}
    return traverse_util.unflatten_dict(flat)


def random_smollm2(seed: int = 0, **overrides):
    """(transformers LlamaForCausalLM float32 in eval mode, our LlamaConfig, our float32 params)."""
    import torch
    import transformers

    hf = {**SMOLLM2_135M, **overrides}
    fields = {k: v for k, v in hf.items() if k != "model_type"}
    torch.manual_seed(seed)
    torch_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).float().eval()
    cfg = llama.LlamaConfig.from_hf(hf)
    return torch_model, cfg, to_flax(torch_model, cfg)
