"""Baseline "LoRA Single": one plain LoRA of rank 4 per task, nothing shared between tasks."""

from cgc_lora_jax.baselines import with_baseline
from cgc_lora_jax.configs import promptcblue


def get_config():
    return with_baseline(promptcblue.get_config(), "lora_single")
