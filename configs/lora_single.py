"""Baseline "LoRA Single": one plain LoRA of rank 4 per task, nothing shared between tasks."""

from cgc_lora_jax.configs import promptcblue


def get_config():
    c = promptcblue.get_config()
    c.lora.num_common, c.lora.common_rank, c.lora.specific_rank, c.lora.gate = 0, 0, 4, "uniform"
    return c
