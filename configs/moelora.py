"""Baseline "MOE-LoRA": 16 common experts of rank 2 mixed by the task gate, no specific experts."""

from cgc_lora_jax.configs import promptcblue


def get_config():
    c = promptcblue.get_config()
    c.lora.num_common, c.lora.common_rank, c.lora.specific_rank = 16, 2, 0
    return c
