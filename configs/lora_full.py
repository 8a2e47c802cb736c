"""Baseline "LoRA Full": one plain LoRA (rank 32 = CGC-LoRA's total rank) trained on all tasks."""

from cgc_lora_jax.baselines import with_baseline
from cgc_lora_jax.configs import promptcblue


def get_config():
    return with_baseline(promptcblue.get_config(), "lora_full")
