"""Ablation "w/o gate": CGC-LoRA with uniform expert weights."""

from configs import promptcblue


def get_config():
    c = promptcblue.get_config()
    c.lora.gate = "uniform"
    return c
