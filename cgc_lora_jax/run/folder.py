"""A run folder's config, task vocabulary and data.

    WORKDIR/config.json        the resolved config                  load_run_config
    WORKDIR/task_vocab.json    task name -> task ID                  read_data (it wins over data.tasks)
    WORKDIR/data/              a generated dataset (the demo's)      data_folder

    cfg = load_run_config("runs/demo")
    splits, vocab = read_data(cfg.data, Path("runs/demo"), seed=cfg.train.seed, splits=("test",),
                              prediction_splits=("test",))
    prompts = encode(cfg.data, list(splits.datasets["test"]), base, vocab, for_prediction=True)
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections

from cgc_lora_jax.data.task_vocab import TaskVocab
from cgc_lora_jax.demo import english
from cgc_lora_jax.demo.dataset import write_demo_dataset
from cgc_lora_jax.layers import CGCLoRAConfig

VOCAB_FILE = "task_vocab.json"
GENERATED_DATASETS = {  # data.format -> writer of a dataset made on first use
    "demo": write_demo_dataset,  # short Chinese tasks for the tiny random base (configs/demo_tiny.py)
    "demo_en": english.write_dataset,  # English reading tasks for the real base (configs/demo.py)
}


class RunError(ValueError):
    """A run that cannot be used as asked (not a run folder, a layout the method cannot use)."""


def load_run_config(workdir: str | Path) -> ml_collections.ConfigDict:
    workdir = Path(workdir)
    path = workdir / "config.json"
    if not workdir.is_dir():
        raise FileNotFoundError(f"{workdir} does not exist: pass the --workdir of a training run")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {workdir} is not a training run's workdir")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def lora_config(lora_cfg, num_tasks: int) -> CGCLoRAConfig:
    """The CGC-LoRA layer config of a config's `lora` section, for `num_tasks` tasks."""
    return CGCLoRAConfig(num_tasks=num_tasks, **lora_cfg.to_dict())


def data_folder(data_cfg, workdir: Path) -> Path:
    """data.path; a generated dataset (data.format "demo" or "demo_en") is written on first use into
    data.path, or WORKDIR/data when data.path is empty."""
    generate = GENERATED_DATASETS.get(data_cfg.format)
    if generate is None:
        if not data_cfg.path:
            raise FileNotFoundError(f"data.path is empty: name the folder holding train.json, dev.json and test.json "
                                    f"(data.format={data_cfg.format!r}) with --config.data.path=FOLDER")
        return Path(data_cfg.path)
    folder = Path(data_cfg.path) if data_cfg.path else Path(workdir) / "data"
    if not (folder / "train.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        generate(folder, seed=0)
    return folder


def read_data(data_cfg, workdir: Path, *, seed: int, splits=("train", "dev"), prediction_splits=()) -> tuple:
    """(Splits, vocab) of a config's data section: the run's saved task vocabulary wins over
    data.tasks; `seed` (the run's train.seed) draws the capped subsets."""
    from cgc_lora_jax.data.records import load_splits

    vocab_file = Path(workdir) / VOCAB_FILE
    vocab = TaskVocab.load(vocab_file) if vocab_file.is_file() else None
    caps = {"train": data_cfg.max_train_per_task or None, "dev": data_cfg.max_eval_per_task or None,
            "test": data_cfg.max_eval_per_task or None}
    extra = {}
    if data_cfg.format == "jsonl":
        extra = dict(input_field=data_cfg.input_field, target_field=data_cfg.target_field, task_field=data_cfg.task_field)
    splits = load_splits(
        data_folder(data_cfg, workdir), data_format=data_cfg.format, splits=splits, prediction_splits=prediction_splits,
        tasks=tuple(data_cfg.tasks) or None, vocab=vocab, max_per_task=caps, seed=seed,
        on_error=data_cfg.on_error, **extra,
    )
    return splits, splits.vocab


def encode(data_cfg, records, base, vocab, for_prediction=False):
    """An EncodedSplit of `records` in the base's prompt format, truncated to data_cfg's budgets."""
    from cgc_lora_jax.data.formatting import encode_split

    return encode_split(records, base.tokenizer, family=base.family, vocab=vocab, max_source_len=data_cfg.max_source_len,
                        max_target_len=data_cfg.max_target_len, for_prediction=for_prediction,
                        prompt_format=data_cfg.prompt_format,
                        truncate_where=data_cfg.get("truncate", "end"))
