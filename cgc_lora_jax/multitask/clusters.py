"""The 1+N pattern: one frozen base model and N clusters of tasks, each cluster with its own
CGC-LoRA module set (experts and gate) trained over the same base.

A cluster is a named group of tasks; a task belongs to at most one cluster. On the command line
and in configs the mapping is a string

    "name1:TaskA,TaskB;name2:TaskC"       (cluster ":" comma-separated tasks, ";" between clusters)

Training runs one ordinary training run per cluster, `data.tasks` set to the cluster's tasks, in
WORKDIR/<cluster>/ (a full run folder each: config.json, task_vocab.json, checkpoints/, adapters/),
and records the mapping in WORKDIR/clusters.json. Each run resumes by itself, so the command can
be repeated after an interruption:

    python -m cgc_lora_jax.multitask.clusters train --config promptcblue --workdir runs/1n \
        --clusters "med:CMeIE,CHIP-CDEE;cls:CHIP-CTC,KUAKE-QIC" [--config.train.steps=2000 ...]

Serving holds the base once and every cluster's adapters beside it; a task's request runs its
cluster's model (the base module with that cluster's `lora`) on the shared base parameters plus the
cluster's adapters, with the task's ID inside its cluster. Switching clusters never reloads or
copies the base:

    server = MultiTaskServer.from_workdir("runs/1n")              # or MultiTaskServer(base, {...})
    server.generate("CHIP-CTC", ["..."], max_new_tokens=64)       # -> ["answer", ...]
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cgc_lora_jax.run import BaseModel
from cgc_lora_jax.export import AdapterSet, attach_adapters, load_frozen_base, read_adapter_meta
from cgc_lora_jax.params import split_params

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


class MultiTaskServer:
    """One frozen base and N clusters' adapter sets; requests are routed by task name.

    base: an HF folder, "builtin:NAME", or a loaded `BaseModel` (its adapters, if any, are
    dropped). adapter_sets: {cluster: run workdir or orbax export folder}. Every set must have
    been trained on this base (same fingerprint).
    """

    def __init__(self, base: str | Path | BaseModel, adapter_sets: dict[str, str | Path], *, with_tokenizer: bool = True):
        if not adapter_sets:
            raise ValueError("a server needs at least one cluster's adapters")
        if isinstance(base, BaseModel):
            frozen, _ = split_params(base.params)
            base = BaseModel(base.family, base.model.clone(lora=None), frozen, base.tokenizer, base.info)
        else:
            first = next(iter(adapter_sets.values()))
            _, _, _, _, dtype = read_adapter_meta(first)
            base = load_frozen_base(str(base), dtype=dtype, with_tokenizer=with_tokenizer)
        self.base = base
        self.clusters: dict[str, AdapterSet] = {}
        self.routes: dict[str, tuple[str, int]] = {}
        for name, folder in adapter_sets.items():
            adapter_set = attach_adapters(base, folder)
            for task_id, task in enumerate(adapter_set.vocab.tasks):
                if task in self.routes:
                    raise ValueError(f"task {task!r} is in clusters {self.routes[task][0]!r} and {name!r}")
                self.routes[task] = (name, task_id)
            self.clusters[name] = adapter_set

    @classmethod
    def from_workdir(cls, workdir: str | Path, base: str | Path | BaseModel | None = None, *,
                     with_tokenizer: bool = True) -> MultiTaskServer:
        """The clusters trained by `train_clusters` in `workdir` (base: the recorded one)."""
        workdir = Path(workdir)
        clusters = json.loads((workdir / CLUSTERS_FILE).read_text())["clusters"]
        if base is None:
            base = read_adapter_meta(workdir / next(iter(clusters)))[1]["base"]["path"]
        return cls(base, {name: workdir / name for name in clusters}, with_tokenizer=with_tokenizer)

    def route(self, task: str) -> tuple[str, int]:
        """(cluster, task ID within the cluster) of `task`."""
        if task not in self.routes:
            raise KeyError(f"task {task!r} is in no cluster; served tasks: {sorted(self.routes)}")
        return self.routes[task]

    def model_and_params(self, task: str):
        """(model with the task's cluster adapters, params = shared base + those adapters, task ID)."""
        cluster, task_id = self.route(task)
        adapter_set = self.clusters[cluster]
        return adapter_set.base.model, adapter_set.params, task_id

    def logits(self, task: str, input_ids, attention_mask=None) -> np.ndarray:
        """Logits [B, T, V] of left-padded input_ids [B, T] for `task`."""
        model, params, task_id = self.model_and_params(task)
        input_ids = jnp.asarray(input_ids, jnp.int32)
        task_ids = jnp.full((input_ids.shape[0],), task_id, jnp.int32)
        mask = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        return np.asarray(jitted_apply(model)({"params": params}, input_ids, mask, task_ids))

    def generate(self, task: str, prompts: Sequence[str] | Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                 **sampling) -> list:
        """Answers of `task` for prompts: texts (formatted like training prompts, answers decoded
        to text) or prompt id lists (new ids returned, up to the first eos). `sampling`: the
        keywords of models.generate.generate (do_sample, temperature, top_p, top_k, rng)."""
        from cgc_lora_jax.data.formatting import PromptFormat
        from cgc_lora_jax.models.generate import generate

        model, params, task_id = self.model_and_params(task)
        if not prompts:
            return []
        tokenizer = self.base.tokenizer
        texts = isinstance(prompts[0], str)
        if texts and tokenizer is None:
            raise ValueError("this server has no tokenizer: pass prompt id lists, not texts")
        fmt = PromptFormat.for_tokenizer(self.base.family, tokenizer) if tokenizer is not None else None
        eos = sampling.pop("eos_token_id", fmt.eos_id if fmt else None)
        pad = sampling.pop("pad_token_id", fmt.pad_id if fmt else 0)
        rows = [fmt.prompt_ids(tokenizer.encode(p, add_special_tokens=False)) if texts else list(p) for p in prompts]
        width = max(len(r) for r in rows)
        input_ids = np.full((len(rows), width), pad, np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for i, row in enumerate(rows):  # left padding, as every family's decode expects
            input_ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
        new_ids = np.asarray(generate(model, params, input_ids, mask, np.full(len(rows), task_id, np.int32),
                                      max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, **sampling))
        stops = set(np.atleast_1d(eos if eos is not None else []).tolist())
        answers = []
        for ids in new_ids.tolist():
            ids = ids[: next((k for k, t in enumerate(ids) if t in stops), len(ids))]
            answers.append(tokenizer.decode(ids).strip() if texts else ids)
        return answers


@functools.cache
def jitted_apply(model):
    """One compiled forward per model (equal modules share it)."""
    return jax.jit(model.apply)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train_cmd = commands.add_parser("train", help="train one CGC-LoRA module set per cluster")
    train_cmd.add_argument("--config", required=True, help="config name (configs/NAME.py)")
    train_cmd.add_argument("--clusters", default=None,
                           help='"name1:TaskA,TaskB;name2:TaskC" (default: the config\'s data.clusters)')
    train_cmd.add_argument("--workdir", required=True, help="folder of the N cluster runs")
    gen_cmd = commands.add_parser("generate", help="answer prompts of one task with the trained clusters")
    gen_cmd.add_argument("--workdir", required=True)
    gen_cmd.add_argument("--task", required=True)
    gen_cmd.add_argument("--prompt", action="append", required=True, help="a prompt text (repeatable)")
    gen_cmd.add_argument("--max-new-tokens", type=int, default=64)
    args, overrides = parser.parse_known_args(argv)
    if args.command == "generate":
        if overrides:
            parser.error(f"unrecognized arguments: {' '.join(overrides)}")
        server = MultiTaskServer.from_workdir(args.workdir)
        for prompt, answer in zip(args.prompt, server.generate(args.task, args.prompt, max_new_tokens=args.max_new_tokens)):
            print(f"{prompt!r} -> {answer!r}")
        return 0
    from cgc_lora_jax.config import parse_args_with_config

    args, cfg = parse_args_with_config(parser, argv)
    try:
        spec = args.clusters if args.clusters is not None else cfg.data.clusters
        if not spec:
            raise ValueError("no clusters: pass --clusters or set --config.data.clusters")
        clusters = parse_clusters(spec)
    except ValueError as e:
        parser.error(str(e))
    for name, summary in train_clusters(cfg, clusters, args.workdir).items():
        print(f"cluster {name}: {summary['step']} steps, adapters in {Path(args.workdir) / name / 'adapters'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
