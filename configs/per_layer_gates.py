"""Ablation "multiple gates": every adapted layer has its own task gate."""

from cgc_lora_jax.configs import promptcblue


def get_config():
    c = promptcblue.get_config()
    c.lora.gate = "per_layer"
    return c
