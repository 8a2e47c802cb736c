"""The demo: CGC-LoRA teaches SmolLM2-135M-Instruct three English reading tasks, on a CPU, in minutes.

`python train.py --config demo` fetches the base on first use (cgc_lora_jax/hub.py, 93 MB),
generates the dataset (cgc_lora_jax/demo/english.py: which city a sentence mentions, whether a
review is positive or negative, the opposite of an adjective; one-word answers), trains
CGC-LoRA on mixed-task batches, then answers the test split twice, with the base as it is (the
same chat-template prompts, no adapters) and with the trained adapters merged per task, and
prints both rows (cgc_lora_jax/evaluation/compare.py; WORKDIR/demo_scores.json).

Sized for a 2-core CPU: prompts of about 45 tokens (most of them the chat template's), one
answer word plus the end token as the target, a short run at a high adapter learning rate, a
small test split and at most 8 new tokens per answer.
"""

from cgc_lora_jax.configs import base


def get_config():
    c = base.get_config()
    c.model.path = "hub:smollm2-135m-instruct"
    # bfloat16 where the CPU multiplies it natively (about 2x float32), float32 on CPUs without
    # (AVX2 only: bf16 is slower there); answers in float32 either way (eval.dtype)
    c.model.dtype = "auto"
    c.lora.num_common, c.lora.common_rank, c.lora.specific_rank = 4, 2, 2
    c.lora.alpha = 28.0
    c.lora.task_embed_dim = 16
    c.lora.dropout = 0.0
    c.data.format = "demo_en"
    c.data.path = ""  # generated into WORKDIR/data
    c.data.tasks = ()
    c.data.max_source_len = 64
    c.data.max_target_len = 8
    c.data.pad_multiple = 52  # every prompt + answer fits in 52 tokens: one compiled step
    c.train.batch_size = 12
    c.train.steps = 40
    c.train.lr = 2e-3
    c.train.warmup_steps = 4
    c.train.log_every = 5
    c.train.eval_every = 0
    c.train.checkpoint_every = 40
    c.train.compile_cache = True
    c.eval.split = "test"
    c.eval.max_new_tokens = 8
    c.eval.batch_size = 24
    c.eval.after_training = True
    c.eval.compare_base = True
    c.eval.dtype = "float32"  # a bf16 base can flip greedy tokens whose top-2 logits are close
    return c
