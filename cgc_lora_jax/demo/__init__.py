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
from pathlib import Path

GENERATED = {  # name -> module with write_dataset(out_dir, seed), TASK_NAMES, score_task
    "demo_en": "cgc_lora_jax.demo.english",
    "demo_zh": "cgc_lora_jax.demo_data",
}
DATA_SEED = 0  # the generated data is fixed; train.seed varies training, not the data


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
