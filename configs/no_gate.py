"""Ablation "w/o gate": CGC-LoRA with uniform expert weights."""

from cgc_lora_jax.baselines import with_baseline
from cgc_lora_jax.configs import promptcblue


def get_config():
    return with_baseline(promptcblue.get_config(), "no_gate")
