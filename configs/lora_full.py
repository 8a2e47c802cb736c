"""Baseline "LoRA Full": one plain LoRA (rank 32 = CGC-LoRA's total rank) trained on all tasks."""

from cgc_lora_jax.configs import promptcblue


def get_config():
    c = promptcblue.get_config()
    c.lora.num_common, c.lora.common_rank, c.lora.specific_rank, c.lora.gate = 1, 32, 0, "uniform"
    return c
