"""cgc-lora-jax: multi-task parameter-efficient fine-tuning of LLMs with CGC-LoRA, in JAX/Flax.

The core is re-exported here (loaded on first use, so `import cgc_lora_jax` alone imports no JAX):

    from cgc_lora_jax import CGCLoRAConfig, Dense, TaskRouting, merge_task, split_params

The model families (`models/` in the repository) and the named configs (`configs/`) belong to
this package: they import as `cgc_lora_jax.models` and `cgc_lora_jax.configs`. A wheel carries
them inside the package (setup.py maps the folders); from a checkout (an editable install, or
PYTHONPATH set to the checkout) `_checkout` maps them to the repository's folders.
"""

import importlib
import os

# We use transformers for tokenizers and formats only; without torch (the core install) it would
# print "PyTorch was not found. Models won't be available", which is true and beside the point here.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from cgc_lora_jax import _checkout

__version__ = "0.1.0"

_checkout.map_repository_folders(__name__, __file__)

CORE = {  # name -> core module defining it
    **dict.fromkeys(("CGCLoRAConfig", "AdapterInputs", "Dense", "TaskRouting", "cgc_lora_dense", "gate_weights",
                     "uniform_weights"), "layers"),
    **dict.fromkeys(("merge_task", "task_lora_factors"), "merge"),
    **dict.fromkeys(("split_params", "join_params", "freeze_base", "count_parameters"), "params"),
    **dict.fromkeys(("make_mesh", "match_partition_rules", "named_shardings"), "sharding"),
    **dict.fromkeys(("load_config",), "config"),
}
__all__ = sorted(CORE)


def __getattr__(name: str):
    if name not in CORE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{CORE[name]}"), name)
