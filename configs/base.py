"""The schema: every field of every config, with what it does and its unit, at the paper's recipe.

Every named config starts from this file (directly, or through one that does) and overrides the
fields it changes; none adds a field. The values are the paper's method and training recipe
(ChatGLM-6B, CGC-LoRA with 8 common experts of rank 2 and a rank-2 expert per task, one shared
gate, MOELoRA's optimiser settings); the dataset is left to the config that names one
(promptcblue.py, firefly.py, the demos). On its own, `--config base` trains on the JSON-lines
folder given as `--config.data.path`. Override any field with `--config.section.field=value`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.path = "checkpoints/chatglm-6b"  # frozen base: HF folder, .gguf file, or hub:NAME (cgc_lora_jax/hub.py)
    c.model.builtin = ""  # "tiny-chatglm": a seeded random tiny ChatGLM-6B-architecture base (demo)
    c.model.dtype = "bfloat16"  # parameter and activation dtype: float32 | bfloat16 | auto (bf16 where it is faster: precision.resolve_dtype)
    c.model.remat = False  # recompute each block in the backward pass (saves activation memory; train.py then adds XLA:CPU's low-memory schedule)

    c.lora = ml_collections.ConfigDict()
    c.lora.num_common = 8  # N_c: task-common experts per adapted layer
    c.lora.common_rank = 2  # rank of each common expert
    c.lora.specific_rank = 2  # rank of each task's own expert (0: none)
    c.lora.alpha = 32.0  # the update is scaled by alpha / total rank
    c.lora.gate = "shared"  # shared | per_layer | uniform (the paper's w/o-gate ablation)
    c.lora.task_embed_dim = 64  # d_e: task embedding width of the gate
    c.lora.init_std = 0.02  # std of the Gaussian init of A
    c.lora.dropout = 0.1  # dropout rate on the adapter input
    c.lora.targets = ""  # regex on layer paths; "": the family's default (ChatGLM: the paper's, Llama/Qwen2: all block linears)

    c.data = ml_collections.ConfigDict()
    c.data.format = "jsonl"  # promptcblue | firefly | jsonl | demo | demo_en: the reader and the scorer (demo*: generated on first use)
    c.data.path = ""  # folder with train.json, dev.json, test.json (generated formats: "" is WORKDIR/data)
    c.data.tasks = ()  # task subset, in task-ID order (empty: every task in train.json)
    c.data.clusters = ""  # 1+N: "name1:TaskA,TaskB;name2:TaskC" for `python -m cgc_lora_jax clusters train`
    c.data.max_train_per_task = 0  # cap on training samples per task (0: no cap)
    c.data.max_eval_per_task = 0  # cap on dev/test samples per task (0: no cap)
    c.data.max_source_len = 1024  # prompt tokens kept (longer prompts are truncated and counted)
    c.data.truncate = "end"  # end | middle: where a long prompt is cut (middle keeps its head and its answer cue)
    c.data.max_target_len = 196  # target tokens kept (longer targets are truncated and counted)
    c.data.on_error = "error"  # error | skip: what a malformed record does (skips are counted)
    c.data.input_field = "input"  # jsonl format: the prompt field
    c.data.target_field = "target"  # jsonl format: the answer field
    c.data.task_field = "task_dataset"  # jsonl format: the task name field
    c.data.prompt_format = "auto"  # auto (chat template if the tokenizer has one) | chat | plain (family layout)
    c.data.pad_multiple = 64  # sequence lengths round up to a multiple of this (few jit shapes)

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 64  # sequences per optimizer step (over all devices and accumulation)
    c.train.grad_accum = 1  # micro-batches per step; batch_size must divide by it
    c.train.steps = 8000  # optimizer steps
    c.train.lr = 2e-4  # peak learning rate (MOELoRA's)
    c.train.warmup_steps = 100  # linear warmup steps, then cosine decay to end_lr_ratio * lr
    c.train.end_lr_ratio = 0.0  # final learning rate as a fraction of lr
    c.train.weight_decay = 0.0  # AdamW decoupled weight decay on the adapters
    c.train.grad_clip = 1.0  # global gradient norm clip (0: off)
    c.train.seed = 42  # seeds adapter init, data order and dropout
    c.train.log_every = 10  # steps between log lines / metrics.jsonl records (0: the last step only)
    c.train.eval_every = 500  # steps between validation losses (0: never)
    c.train.eval_batches = 8  # batches of dev.json per validation
    c.train.checkpoint_every = 500  # steps between checkpoints (0: the last step and preemption only)
    c.train.keep_checkpoints = 3  # checkpoints kept in the workdir
    c.train.compile_cache = False  # keep compiled steps in $CGC_LORA_JAX_CACHE/jax-compile, so a rerun skips compiling

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel axis size (-1: the devices left over)
    c.mesh.fsdp = 1  # fully-sharded axis size (parameters and batch)
    c.mesh.tensor = 1  # tensor-parallel axis size

    c.eval = ml_collections.ConfigDict()
    c.eval.split = "test"  # dev | test: the file eval.py predicts
    c.eval.max_new_tokens = 196  # generation length cap per answer
    c.eval.batch_size = 16  # prompts per generation batch
    c.eval.after_training = False  # train.py evaluates eval.split when training ends (--no-eval skips it)
    c.eval.compare_base = False  # with after_training: also answer with the base alone, side by side (evaluation/compare.py)
    c.eval.dtype = ""  # dtype of the base when answering ("": model.dtype); float32 keeps bf16 rounding from flipping greedy tokens
    return c
