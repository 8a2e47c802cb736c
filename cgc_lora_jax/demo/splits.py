"""One split generator for the generated datasets (`cgc_lora_jax.demo.dataset`, `.english`).

    splits = generate_splits(TASK_NAMES, example, {"train": 256, "dev": 32, "test": 32}, seed=0)

Task k draws from numpy.random.default_rng([seed, k]) and an input never repeats within a task,
so dev and test inputs are unseen in training; each split is then shuffled across tasks
(default_rng([seed, number of tasks, split index])) and numbered "<split>-<n>".
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from cgc_lora_jax.data.records import write_records


def generate_splits(tasks: Sequence[str], example: Callable[[str, np.random.Generator], dict],
                    sizes: Mapping[str, int], seed: int) -> dict[str, list[dict]]:
    """{split: records}: sizes[split] records of every task, each split shuffled across tasks.

    example(task, rng) draws one record (PromptCBLUE fields but sample_id)."""
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


def write_splits(splits: Mapping[str, list[dict]], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write OUT_DIR/<split>.json for every split of `splits`; returns {split: path}."""
    paths = {}
    for split, rows in splits.items():
        paths[split] = Path(out_dir) / f"{split}.json"
        write_records(rows, paths[split])
    return paths


def known_task(name: str, tasks: Sequence[str]) -> str:
    """`name` itself when it is one of `tasks` (a generated dataset's scorer), else KeyError."""
    if name not in tasks:
        raise KeyError(name)
    return name
