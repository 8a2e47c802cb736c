"""Generated datasets: a dataset that a config can name instead of a folder of files.

`data.generate = NAME` writes NAME's train.json, dev.json and test.json (PromptCBLUE-shaped
records, test with its targets) into `data.path`, or WORKDIR/data when `data.path` is empty, the
first time a run needs them; the run then reads them like any PromptCBLUE folder, and scores
them with NAME's scorer (registered in `cgc_lora_jax.scoring.BENCHMARKS` under the same name).

    demo_en   cgc_lora_jax.demo.english: English reading tasks for a real base (`--config demo`)
    demo_zh   cgc_lora_jax.demo_data: short Chinese tasks for the tiny random base (`--config demo_tiny`)

    write_generated("demo_en", "runs/demo/data")
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

GENERATED = {  # name -> module with write_dataset(out_dir, seed), TASK_NAMES, score_task
    "demo_en": "cgc_lora_jax.demo.english",
    "demo_zh": "cgc_lora_jax.demo_data",
}
DATA_SEED = 0  # the generated data is fixed; train.seed varies training, not the data


def generate_splits(tasks: Sequence[str], example: Callable[[str, np.random.Generator], dict],
                    sizes: Mapping[str, int], seed: int) -> dict[str, list[dict]]:
    """{split: records}: sizes[split] records of every task, each split shuffled across tasks.

    example(task, rng) draws one record (PromptCBLUE fields but sample_id); task k draws from
    numpy.random.default_rng([seed, k]) and an input never repeats within a task, so dev and
    test inputs are unseen in training. Sample ids are "<split>-<n>" in the shuffled order.
    """
    splits: dict[str, list[dict]] = {split: [] for split in sizes}
    for k, task in enumerate(tasks):
        rng = np.random.default_rng([seed, k])
        seen: set[str] = set()
        for split, size in sizes.items():
            for _ in range(size):
                for _attempt in range(1000):
                    record = example(task, rng)
                    if record["input"] not in seen:
                        break
                else:
                    raise ValueError(f"{task} has too few distinct inputs for sizes {dict(sizes)}")
                seen.add(record["input"])
                splits[split].append(record)
    for i, (split, rows) in enumerate(splits.items()):
        order = np.random.default_rng([seed, len(tasks), i]).permutation(len(rows))
        splits[split] = [dict(rows[j], sample_id=f"{split}-{n}") for n, j in enumerate(order)]
    return splits


def generated_module(name: str):
    if name not in GENERATED:
        raise ValueError(f"data.generate={name!r}: no generated dataset of that name; choose one of "
                         f"{', '.join(GENERATED)} (or leave it empty to read data.path)")
    return importlib.import_module(GENERATED[name])


def write_generated(name: str, folder: str | os.PathLike) -> Path:
    """Write the dataset `name` into `folder` unless its train.json is already there."""
    folder = Path(folder)
    if not (folder / "train.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        generated_module(name).write_dataset(folder, seed=DATA_SEED)
    return folder
