"""The 1+N pattern: one frozen base model and N clusters of tasks, each cluster with its own
CGC-LoRA module set (experts and gate) trained over the same base.

A cluster is a named group of tasks; a task belongs to at most one cluster. On the command line
and in configs the mapping is a string

    "name1:TaskA,TaskB;name2:TaskC"       (cluster ":" comma-separated tasks, ";" between clusters)

Training runs one ordinary training run per cluster, `data.tasks` set to the cluster's tasks, in
WORKDIR/<cluster>/ (a full run folder each: config.json, task_vocab.json, checkpoints/, adapters/),
and records the mapping in WORKDIR/clusters.json. Each run resumes by itself, so the command can
be repeated after an interruption:

    python -m cgc_lora_jax clusters train --config promptcblue --workdir runs/1n \
        --clusters "med:CMeIE,CHIP-CDEE;cls:CHIP-CTC,KUAKE-QIC" [--config.train.steps=2000 ...]

The trained clusters are served by `cgc_lora_jax.multitask.server.MultiTaskServer`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import ml_collections

CLUSTERS_FILE = "clusters.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a cluster name is also a folder name


def parse_clusters(text: str) -> dict[str, tuple[str, ...]]:
    """{cluster: tasks} from "name1:TaskA,TaskB;name2:TaskC"; errors name the bad part."""
    clusters: dict[str, tuple[str, ...]] = {}
    owner: dict[str, str] = {}
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        name, sep, tasks_text = (s.strip() for s in part.partition(":"))
        tasks = tuple(t.strip() for t in tasks_text.split(",") if t.strip())
        if not sep or not tasks:
            raise ValueError(f"cluster {part!r}: expected NAME:TaskA,TaskB")
        if not _NAME.fullmatch(name):
            raise ValueError(f"cluster name {name!r}: use letters, digits, '_', '-', '.' (it names a folder)")
        if name in clusters:
            raise ValueError(f"cluster {name!r} is defined twice")
        for task in tasks:
            if task in owner:
                raise ValueError(f"task {task!r} is in clusters {owner[task]!r} and {name!r}; a task has one cluster")
            owner[task] = name
        clusters[name] = tasks
    if not clusters:
        raise ValueError(f"no cluster in {text!r}: expected e.g. 'a:TaskA,TaskB;b:TaskC'")
    return clusters


def format_clusters(clusters: dict[str, Sequence[str]]) -> str:
    """The inverse of `parse_clusters`."""
    return ";".join(f"{name}:{','.join(tasks)}" for name, tasks in clusters.items())


def cluster_config(cfg: ml_collections.ConfigDict, tasks: Sequence[str]) -> ml_collections.ConfigDict:
    """A locked copy of `cfg` training only `tasks` (in this order: their task IDs 0..n-1)."""
    copy = ml_collections.ConfigDict(cfg.to_dict())
    copy.data.tasks = tuple(tasks)
    copy.lock()
    return copy


def train_clusters(cfg: ml_collections.ConfigDict, clusters: dict[str, Sequence[str]], workdir: str | Path) -> dict:
    """Train one CGC-LoRA module set per cluster over the same base; {cluster: train summary}."""
    from cgc_lora_jax.training.loop import train

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    record = workdir / CLUSTERS_FILE
    clusters = {name: list(tasks) for name, tasks in clusters.items()}
    if record.is_file() and json.loads(record.read_text())["clusters"] != clusters:
        raise ValueError(f"{record} holds other clusters; use a new workdir for a new grouping")
    record.write_text(json.dumps({"clusters": clusters}, indent=2, ensure_ascii=False) + "\n")
    return {name: train(cluster_config(cfg, tasks), workdir / name) for name, tasks in clusters.items()}
