"""Ablation "multiple gates": every adapted layer has its own task gate."""

from cgc_lora_jax.baselines import with_baseline
from cgc_lora_jax.configs import promptcblue


def get_config():
    return with_baseline(promptcblue.get_config(), "per_layer_gates")
