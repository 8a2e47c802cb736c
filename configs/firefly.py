"""The paper's Firefly setting (section 5.4): 8 general tasks, capped at 1800/300/300 samples."""

from cgc_lora_jax.configs import base
from cgc_lora_jax.scoring import firefly


def get_config():
    c = base.get_config()
    c.data.format = "firefly"
    c.data.path = "data/firefly"
    c.data.tasks = firefly.PAPER_TASKS
    c.data.max_train_per_task = firefly.PAPER_SPLIT_SIZES["train"]
    c.data.max_eval_per_task = firefly.PAPER_SPLIT_SIZES["dev"]
    return c
