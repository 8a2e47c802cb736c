"""Serving the 1+N pattern: one frozen base and N clusters' adapter sets, routed by task name.

The server holds the base once and every cluster's adapters beside it; a task's request runs its
cluster's model (the base module with that cluster's `lora`) on the shared base parameters plus
the cluster's adapters, with the task's ID inside its cluster. Switching clusters never reloads or
copies the base. Prompts become answers along evaluation's one path (evaluation.answers):

    server = MultiTaskServer.from_workdir("runs/1n")              # or MultiTaskServer(base, {...})
    server.generate("CHIP-CTC", ["..."], max_new_tokens=64)       # -> ["answer", ...]
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cgc_lora_jax.data.formatting import PromptFormat
from cgc_lora_jax.evaluation.answers import GenerationSettings, generate_answers, prompts_from_ids, prompts_from_texts
from cgc_lora_jax.multitask.clusters import CLUSTERS_FILE
from cgc_lora_jax.params import split_params
from cgc_lora_jax.run import AdapterSet, BaseModel, attach_adapters, load_frozen_base, read_adapter_meta


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
                 max_source_len: int = 1024, **sampling) -> list:
        """Answers of `task` for prompts: texts (formatted and truncated like training prompts,
        answers decoded to text and cut at eos or pad) or prompt id lists (new ids returned, up to
        the first eos). `sampling`: the keywords of models.generate.generate (do_sample,
        temperature, top_p, top_k, rng, eos_token_id, pad_token_id)."""
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
        if texts:
            encoded = prompts_from_texts(prompts, tokenizer, self.base.family, task_id, max_source_len)
        else:
            encoded = prompts_from_ids(prompts, pad, task_id)
        encoded.pad_id = pad
        # One batch of every prompt: the answers come back in one compiled decode.
        settings = GenerationSettings(batch_size=len(prompts), max_new_tokens=max_new_tokens, pad_multiple=1)
        answers = generate_answers(model, params, encoded, np.arange(len(prompts)), settings,
                                   tokenizer if texts else None, eos_token_id=eos, with_task_ids=True, **sampling)
        return [answers[i] for i in range(len(prompts))]


@functools.cache
def jitted_apply(model):
    """One compiled forward per model (equal modules share it)."""
    return jax.jit(model.apply)
