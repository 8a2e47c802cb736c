"""The paper's Firefly setting (section 5.4): 8 general tasks, capped at 1800/300/300 samples."""

from cgc_lora_jax.configs import promptcblue

FIREFLY_TASKS = ("TextCorrection", "Summary", "KeywordRecognition", "TextMatching", "SentimentAnalyze", "MRC", "NER", "NLI")


def get_config():
    c = promptcblue.get_config()
    c.data.format = "firefly"
    c.data.path = "data/firefly"
    c.data.tasks = FIREFLY_TASKS
    c.data.max_train_per_task = 1800
    c.data.max_eval_per_task = 300
    return c
