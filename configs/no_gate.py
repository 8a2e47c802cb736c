"""Ablation "w/o gate": CGC-LoRA with uniform expert weights."""

from cgc_lora_jax.configs import promptcblue


def get_config():
    c = promptcblue.get_config()
    c.lora.gate = "uniform"
    return c
