"""Baseline "MOE-LoRA": 16 common experts of rank 2 mixed by the task gate, no specific experts."""

from cgc_lora_jax.baselines import with_baseline
from cgc_lora_jax.configs import promptcblue


def get_config():
    return with_baseline(promptcblue.get_config(), "moelora")
