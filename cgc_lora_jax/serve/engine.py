"""The continuous-batching engine: 1 + N served from slot groups over one base in memory.

Slot groups: one per cluster of a 1+N folder (a training run is one cluster, named after its
folder), each holding that cluster's adapters beside the shared base arrays (the base exists
once in memory, whatever N is), plus one group "base" running the bare base with no adapters.
A group's requests of every task share each of its decode steps (the fused CGC-LoRA layer reads
task IDs per row); different clusters have different adapter layouts, so they run their own
decode program, one per group, compiled at start-up with every prefill bucket.

A background thread runs the loop

    free the slots of cancelled requests          (a client that went away frees it at once)
    admit: waiting requests of a group -> its free slots, prefilled in batches (FIFO)
    step: one decode step of every group with an active slot
    hand each new token to its request; an ended request frees its slot

Requests wait in per-group FIFO queues; more than `max_queue` waiting in all is `QueueFull`
(HTTP 429). The loop sleeps while there is nothing to do.

    engine = Engine.from_workdir("runs/demo", EngineConfig(slots=16, context=256))
    engine.start()                                             # compiles, then serves
    gen = engine.submit("DigitsToChinese", prompt_ids, SamplingParams(max_tokens=32), loop)
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import random
import threading
import time
import traceback
from pathlib import Path

import jax
import numpy as np

from cgc_lora_jax.multitask.clusters import CLUSTERS_FILE
from cgc_lora_jax.multitask.server import MultiTaskServer
from cgc_lora_jax.params import split_params
from cgc_lora_jax.run import read_adapter_meta
from cgc_lora_jax.serve.prompts import PromptBuilder
from cgc_lora_jax.serve.generation import Generation, QueueFull, RequestError, SamplingParams
from cgc_lora_jax.serve.slots import Sampling, SlotGroup

log = logging.getLogger("cgc_lora_jax.serve")
BASE_MODEL_ID = "base"  # the model id (and slot group) of the bare base, no adapters


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    slots: int = 16  # decode slots per cluster group (rows of its one decode program)
    base_slots: int = 0  # decode slots of the bare base's group (0: as many as `slots`)
    context: int = 512  # KV cache positions per slot: prompt + answer tokens at most
    prefill_batch: int = 4  # prompts prefilled together (rows of each prefill program)
    min_bucket: int = 16  # shortest prefill bucket; buckets double up to cover `longest_prompt`
    max_prompt: int = 0  # longest prompt accepted, in tokens (0: context - 1); fewer buckets to compile
    max_queue: int = 256  # requests waiting for a slot, over all groups, before 429

    @property
    def longest_prompt(self) -> int:
        return min(self.max_prompt or self.context - 1, self.context - 1)

    def buckets(self) -> tuple[int, ...]:
        """Prompt lengths the prefill programs take (prompts are left-padded up to one)."""
        sizes, size = [], self.min_bucket
        while True:
            sizes.append(size)
            if size >= self.longest_prompt:
                return tuple(sizes)
            size *= 2


@dataclasses.dataclass
class _Group:
    name: str
    slots: SlotGroup
    tasks: tuple[str, ...]
    waiting: collections.deque = dataclasses.field(default_factory=collections.deque)

    def __post_init__(self):
        size = self.slots.slots
        self.active: list[Generation | None] = [None] * size
        self.task_ids = np.zeros(size, np.int32)
        self.sampling = Sampling.greedy(size)
        self.counts = np.zeros(size, np.int32)


def _megabytes(tree) -> float:
    return sum(x.nbytes for x in jax.tree.leaves(tree)) / 2**20


def load_server(workdir: str | Path, base: str | None = None) -> MultiTaskServer:
    """The base and adapters of a 1+N cluster folder (clusters.json) or of one training run."""
    workdir = Path(workdir)
    if (workdir / CLUSTERS_FILE).is_file():
        return MultiTaskServer.from_workdir(workdir, base)
    if not (workdir / "adapters" / "meta.json").is_file():
        raise FileNotFoundError(f"{workdir}: neither a 1+N cluster folder ({CLUSTERS_FILE}) nor a training run "
                                "with trained adapters (adapters/meta.json)")
    base = base or read_adapter_meta(workdir)[1]["base"]["path"]
    return MultiTaskServer(base, {workdir.resolve().name: workdir})


def _prompt_format(server: MultiTaskServer) -> str:
    """The data.prompt_format the adapter sets were trained with (one for all clusters)."""
    formats = {name: s.meta.get("config", {}).get("data", {}).get("prompt_format", "auto")
               for name, s in server.clusters.items()}
    if len(set(formats.values())) > 1:
        raise ValueError(f"the clusters were trained with different data.prompt_format values: {formats}")
    return next(iter(formats.values()), "auto")


class Engine:
    """Slot groups, queues and the loop thread; see the module docstring."""

    def __init__(self, server: MultiTaskServer, config: EngineConfig = EngineConfig()):
        if server.base.tokenizer is None:
            raise ValueError("serving needs the base's tokenizer")
        self.server, self.config = server, config
        self.prompts = PromptBuilder(server.base.family, server.base.tokenizer, _prompt_format(server))
        self.groups: dict[str, _Group] = {}
        self.routes: dict[str, tuple[str, int]] = {}
        for name, adapter_set in server.clusters.items():
            slots = SlotGroup(adapter_set.base.model, adapter_set.params, slots=config.slots,
                              length=config.context, prefill_batch=config.prefill_batch)
            self.groups[name] = _Group(name, slots, tuple(adapter_set.vocab.tasks))
            for task_id, task in enumerate(adapter_set.vocab.tasks):
                self.routes[task] = (name, task_id)
        if BASE_MODEL_ID in self.routes or BASE_MODEL_ID in self.groups:
            raise ValueError(f"a task or cluster is named {BASE_MODEL_ID!r}, the bare base's model id")
        base_slots = SlotGroup(server.base.model, server.base.params, slots=config.base_slots or config.slots,
                               length=config.context, prefill_batch=config.prefill_batch)
        self.groups[BASE_MODEL_ID] = _Group(BASE_MODEL_ID, base_slots, ())
        self.routes[BASE_MODEL_ID] = (BASE_MODEL_ID, 0)
        self._lock = threading.Condition()
        self._waiting = 0
        self._paused = self._stopping = False
        self._thread: threading.Thread | None = None

    @classmethod
    def from_workdir(cls, workdir: str | Path, config: EngineConfig = EngineConfig(), base: str | None = None):
        return cls(load_server(workdir, base), config)

    @property
    def model_ids(self) -> list[str]:
        return list(self.routes)

    # ---- start-up -------------------------------------------------------------------------

    def memory_report(self) -> list[str]:
        base = self.server.base
        lines = [f"base {base.info['path']} ({base.family}): {_megabytes(base.params):.1f} MiB of parameters, "
                 f"held once"]
        for name, adapter_set in self.server.clusters.items():
            _, adapters = split_params(adapter_set.params)
            lines.append(f"adapter set {name!r}: tasks {', '.join(adapter_set.vocab.tasks)}; "
                         f"{_megabytes(adapters):.2f} MiB")
        for group in self.groups.values():
            lines.append(f"slot group {group.name!r}: {group.slots.slots} slots x {self.config.context} positions, "
                         f"KV cache {group.slots.cache_bytes / 2**20:.1f} MiB")
        lines.append(f"chat prompts: {self.prompts.chat_mode}")
        return lines

    def warm_up(self) -> float:
        """Compile every group's prefill buckets and decode step now; seconds taken."""
        start = time.perf_counter()
        pad = self.prompts.format.pad_id
        for group in self.groups.values():
            for bucket in self.config.buckets():  # into slot S: dropped, nothing changes
                group.slots.prefill([], bucket, [], [], Sampling.greedy(self.config.prefill_batch), pad)
            group.slots.step(group.task_ids, group.sampling, group.counts)
        return time.perf_counter() - start

    def start(self, warm_up: bool = True) -> None:
        for line in self.memory_report():
            log.info(line)
        if warm_up:
            seconds = self.warm_up()
            log.info(f"compiled {len(self.groups)} decode programs and {len(self.groups)} x "
                     f"{len(self.config.buckets())} prefill programs (buckets {self.config.buckets()}) in "
                     f"{seconds:.1f} s")
        self._thread = threading.Thread(target=self._run, name="serve-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()

    # ---- the client side (event loop thread) ------------------------------------------------

    def submit(self, model_id: str, prompt_ids: list[int], params: SamplingParams, loop) -> Generation:
        """Queue a request; RequestError when it cannot be served, QueueFull when the queue is."""
        if model_id not in self.routes:
            raise RequestError(f"The model {model_id!r} does not exist. Available models: "
                               f"{', '.join(self.model_ids)}", 404, "model_not_found", "model")
        context, n = self.config.context, len(prompt_ids)
        if n == 0:
            raise RequestError("the prompt is empty", 400, None, "prompt")
        if n >= context:
            raise RequestError(f"the prompt has {n} tokens, but the context holds {context} tokens in all "
                               "(prompt and answer)", 400, "context_length_exceeded", "prompt")
        if n > self.config.longest_prompt:
            raise RequestError(f"the prompt has {n} tokens; this server takes prompts of at most "
                               f"{self.config.longest_prompt} tokens (--max-prompt)", 400, "context_length_exceeded",
                               "prompt")
        if n + params.max_tokens > context:
            raise RequestError(f"This model's maximum context length is {context} tokens. However, you requested "
                               f"{n + params.max_tokens} tokens ({n} in the prompt, {params.max_tokens} for the "
                               "completion).", 400, "context_length_exceeded", "max_tokens")
        group_name, task_id = self.routes[model_id]
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        gen = Generation(prompt_ids, params, self.prompts.tokenizer, self.prompts.stop_ids, loop, seed=seed,
                         model_id=model_id, route=(group_name, task_id))
        with self._lock:
            if self._waiting >= self.config.max_queue:
                raise QueueFull(self.config.max_queue)
            self.groups[group_name].waiting.append(gen)
            self._waiting += 1
            self._lock.notify_all()
        return gen

    def cancel(self, gen: Generation) -> None:
        """The client went away: drop the request from its queue, or free its slot."""
        with self._lock:
            if gen.done or gen.cancelled:
                return
            gen.cancelled = True
            waiting = self.groups[gen.route[0]].waiting
            if gen in waiting:
                waiting.remove(gen)
                self._waiting -= 1
            self._lock.notify_all()

    def pause(self) -> None:
        """Stop admitting and stepping (cancellations are still served); `resume` goes on."""
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            self._lock.notify_all()

    def stats(self) -> dict:
        with self._lock:
            return {"queued": self._waiting, "paused": self._paused, "groups": {
                name: {"slots": g.slots.slots, "active": sum(a is not None for a in g.active)}
                for name, g in self.groups.items()}}

    # ---- the loop (engine thread) -----------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while True:
                    if self._stopping:
                        return
                    self._free_cancelled()
                    busy = any(a is not None for g in self.groups.values() for a in g.active)
                    if not self._paused and (busy or self._waiting):
                        break
                    self._lock.wait()
                admissions = self._take_admissions()
            for group in self.groups.values():
                try:
                    for batch in admissions.get(group.name, []):
                        self._prefill(group, batch)
                    if any(a is not None for a in group.active):
                        self._step(group)
                except Exception:  # the group's cache may be gone: fail its requests, start it afresh
                    self._reset(group, traceback.format_exc())

    def _free_cancelled(self) -> None:
        for group in self.groups.values():
            for s, gen in enumerate(group.active):
                if gen is not None and gen.cancelled:
                    group.active[s] = None

    def _take_admissions(self) -> dict[str, list[list[tuple[int, Generation]]]]:
        """{group: batches of (slot, request)} for every free slot a waiting request can take."""
        admissions = {}
        for group in self.groups.values():
            free = [s for s, gen in enumerate(group.active) if gen is None]
            batches = []
            while free and group.waiting:
                batch = []
                while free and group.waiting and len(batch) < self.config.prefill_batch:
                    slot, gen = free.pop(0), group.waiting.popleft()
                    group.active[slot] = gen
                    batch.append((slot, gen))
                    self._waiting -= 1
                batches.append(batch)
            if batches:
                admissions[group.name] = batches
        return admissions

    def _prefill(self, group: _Group, batch: list[tuple[int, Generation]]) -> None:
        length = max(len(gen.prompt_ids) for _, gen in batch)
        bucket = next(b for b in self.config.buckets() if b >= length)
        sampling = Sampling.greedy(self.config.prefill_batch)
        for row, (slot, gen) in enumerate(batch):
            p = gen.params
            for target, r in ((sampling, row), (group.sampling, slot)):
                target.set_row(r, p.temperature, p.top_k, p.top_p, gen.seed)
            group.task_ids[slot] = gen.route[1]
        first = group.slots.prefill([gen.prompt_ids for _, gen in batch], bucket, [gen.route[1] for _, gen in batch],
                                    [slot for slot, _ in batch], sampling, self.prompts.format.pad_id)
        for (slot, gen), token in zip(batch, first):
            self._deliver(group, slot, gen, int(token))

    def _step(self, group: _Group) -> None:
        for s, gen in enumerate(group.active):
            group.counts[s] = gen.produced if gen is not None else 0
        tokens = group.slots.step(group.task_ids, group.sampling, group.counts)
        for s, gen in enumerate(group.active):
            if gen is not None:
                self._deliver(group, s, gen, int(tokens[s]))

    def _deliver(self, group: _Group, slot: int, gen: Generation, token: int) -> None:
        if gen.cancelled or gen.push(token):
            with self._lock:
                if group.active[slot] is gen:
                    group.active[slot] = None

    def _reset(self, group: _Group, error: str) -> None:
        log.error(f"slot group {group.name!r} failed; its requests get an error and it starts afresh:\n{error}")
        with self._lock:
            for s, gen in enumerate(group.active):
                if gen is not None:
                    gen.fail("internal error while decoding; see the server log")
                    group.active[s] = None
        old = group.slots
        group.slots = SlotGroup(old.model, old.params, slots=old.slots, length=old.length,
                                prefill_batch=old.prefill_batch)
