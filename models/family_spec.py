"""What a model family provides to the loader, the saver, the sharding rules and generation.

Each family module (models/chatglm.py, models/chatglm2.py, models/llama.py) defines one or more
`ModelFamily` values; models/family.py lists them in `FAMILIES`. The loader (models/hf_io.py)
detects the family from config.json, builds the Flax module, and fills its parameters from the
checkpoint with the family's explicit key map; the saver inverts the same map.

The module contract, for every family:

    model.apply({"params": p}, input_ids, attention_mask=None, task_ids=None,
                deterministic=True) -> logits [B, T, V] float32

input_ids [B, T] int32, left-padded; attention_mask [B, T] int (1 = token, 0 = pad; None = all
tokens). Positions and attention masks are derived from these the way the original model does.
task_ids [B] int32 selects each sample's task for the CGC-LoRA adapters (`lora` attribute).

Incremental decoding with a KV cache:

    cache = model.init_cache(batch_size, max_length)          # no params needed
    logits, cache = model.apply(vars, input_ids, attention_mask, task_ids,
                                cache=cache, method=model.decode)

The first `decode` call takes the whole (left-padded) prompt, later calls one token per row
(attention_mask then is [B, 1] of ones). A family's decode may accept `last_only=True` (logits
[B, 1, V] of the chunk's last position); generation then passes it. The cache is the one structure
of models/blocks.py: arrays with static shapes, so a jit-compiled decode step never recompiles.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from jax.sharding import PartitionSpec

# HF tensor name -> (Flax parameter path, transpose?). Transposes turn torch Linear weights
# [out, in] into Flax kernels [in, out]; no other transform is allowed, so saving inverts it.
KeyMap = dict[str, tuple[tuple[str, ...], bool]]


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    name: str  # e.g. "chatglm", "chatglm2", "llama", "qwen2"
    matches: Callable[[dict], bool]  # does this config.json dict belong to the family?
    config_from_hf: Callable[[dict], Any]  # config.json dict -> the family's config dataclass
    build: Callable[..., Any]  # (config, *, dtype, param_dtype, lora, remat) -> nn.Module
    key_map: Callable[[Any], KeyMap]  # every stored tensor the model uses
    ignored_keys: str  # regex of stored tensors the model derives itself (rotary inv_freq, ...)
    partition_rules: tuple[tuple[str, PartitionSpec], ...]  # (regex on "a/b/kernel", spec), catch-all last
    default_lora_targets: str = ".*"  # regex on layer paths adapted when a config's lora.targets is ""
