"""A run folder and everything a stage needs from it: config, task vocabulary, data, base, adapters.

Training writes a run folder; evaluation, the baselines, 1+N serving and export read it:

    WORKDIR/config.json        the resolved config                  load_run_config
    WORKDIR/task_vocab.json    task name -> task ID                  read_data (it wins over data.tasks)
    WORKDIR/data/              a generated dataset (the demo's)      data_folder
    WORKDIR/tokenizer/         a built-in base's tokenizer           load_base
    WORKDIR/adapters/          trained adapters + meta.json          save_adapters / attach_adapters

By concern: folder.py (the config, task vocabulary and data), base.py (the frozen base and its
tokenizer, identified by a fingerprint), adapters.py (trained adapters on a loaded base). Import
them from here:

    cfg = load_run_config("runs/demo")
    splits, vocab = read_data(cfg.data, Path("runs/demo"), seed=cfg.train.seed, splits=("test",),
                              prediction_splits=("test",))
    base = load_base(cfg.model, lora=None)                  # BaseModel: model, params, tokenizer
    run = attach_adapters(base, "runs/demo")               # AdapterSet: the model with `lora`
    prompts = encode(cfg.data, list(splits.datasets["test"]), run.base, vocab, for_prediction=True)
"""

from cgc_lora_jax.run.adapters import (ADAPTERS_DIR, AdapterSet, adapter_shapes, attach_adapters, load_adapter_set,
                                       load_adapters, read_adapter_meta, save_adapters)
from cgc_lora_jax.run.base import (BUILTIN_PREFIX, BUILTIN_SEED, DTYPES, OBTAIN_CHATGLM, BaseMismatchError, BaseModel,
                                   answering_model_config, fingerprint_base, load_base, load_frozen_base, load_tokenizer,
                                   tiny_chatglm_config)
from cgc_lora_jax.run.folder import (GENERATED_DATASETS, VOCAB_FILE, RunError, data_folder, encode, load_run_config,
                                     lora_config, read_data)

__all__ = [
    "ADAPTERS_DIR", "AdapterSet", "adapter_shapes", "attach_adapters", "load_adapter_set", "load_adapters",
    "read_adapter_meta", "save_adapters",
    "BUILTIN_PREFIX", "BUILTIN_SEED", "DTYPES", "OBTAIN_CHATGLM", "BaseMismatchError", "BaseModel",
    "answering_model_config", "fingerprint_base", "load_base", "load_frozen_base", "load_tokenizer", "tiny_chatglm_config",
    "GENERATED_DATASETS", "VOCAB_FILE", "RunError", "data_folder", "encode", "load_run_config", "lora_config",
    "read_data",
]
