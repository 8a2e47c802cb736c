"""The paper's PromptCBLUE setting: ChatGLM-6B, 8 medical tasks, CGC-LoRA with 8 common experts.

The recipe is the schema's (configs/base.py); this file names the data: the PromptCBLUE folder
and the 8 tasks of the MOELoRA / CGC-LoRA papers, in task-ID order, scored by the official rules.
"""

from cgc_lora_jax.configs import base
from cgc_lora_jax.scoring.promptcblue import PAPER_TASKS


def get_config():
    c = base.get_config()
    c.data.format = "promptcblue"
    c.data.path = "data/PromptCBLUE"
    c.data.tasks = PAPER_TASKS
    return c
