"""The offline demo: a generated Chinese multi-task dataset and a tiny random ChatGLM-6B-architecture base.

Needs no download and runs end to end on a CPU in a minute or two: CGC-LoRA training, then a
per-task evaluation table. It shows the machinery working (mixed-task batches, gate, frozen base,
checkpoints, merging) and is what the tests train; the base knows nothing, so the scores say
nothing about the method's quality on real tasks (that is `--config demo`).
"""

from cgc_lora_jax.configs import base


def get_config():
    c = base.get_config()
    c.model.path = ""
    c.model.builtin = "tiny-chatglm"
    c.model.dtype = "float32"
    c.lora.num_common, c.lora.common_rank, c.lora.specific_rank = 4, 4, 4
    c.lora.alpha = 64.0
    c.lora.task_embed_dim = 16
    c.lora.dropout = 0.0
    c.data.format = "demo"
    c.data.path = ""  # generated into WORKDIR/data
    c.data.tasks = ()
    c.data.max_source_len = 64
    c.data.max_target_len = 32
    c.data.pad_multiple = 16
    c.train.batch_size = 32
    c.train.steps = 300
    c.train.lr = 3e-3
    c.train.warmup_steps = 20
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.eval_batches = 2
    c.train.checkpoint_every = 100
    c.eval.split = "test"
    c.eval.max_new_tokens = 32
    c.eval.batch_size = 32
    c.eval.after_training = True
    return c
