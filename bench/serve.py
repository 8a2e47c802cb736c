"""Serving throughput and latency over HTTP: mixed-task fused continuous batching vs the bare base
vs one task at a time with merged weights.

One base (SmolLM2-135M shapes with random weights: Llama, 30 blocks, hidden 576, intermediate
1536, 9 heads, 3 KV heads, vocab 49152, tied embeddings; float32; or `--model tiny`), one run of 8
tasks (CGC-LoRA as the paper's config: 8 common experts of rank 2, a rank-2 expert per task, on
every projection, random non-zero weights). `--clients` concurrent clients on loopback each send
`--requests` completions one after another: a fixed prompt of `--prompt-len` token ids, a fixed
answer of `--answer-len` tokens (ignore_eos), greedy, the task drawn at random per request.

    mixed     the tasks' model ids on the continuous-batching engine: every decode step mixes
              tasks in the fused layer (--slots slots)
    base      the same load sent to model "base": the bare base on the same engine, no adapters
              (the floor: what the adapters cost is mixed / base)
    one_task  today's pattern (eval.py's merged mode) behind the same HTTP app: the oldest
              waiting request's task is served alone, its experts merged into the base weights,
              its waiting requests generated as one static batch (models.generate, at most
              --one-task-batch rows = the paper config's eval.batch_size, padded to a power of
              two >= 4 so few programs compile), then the next task

Before the HTTP rounds, the decode step alone: one step of all slots with mixed tasks vs one of
the bare base (interleaved, medians), the adapters' cost without HTTP, prefill or scheduling.

Variants run in interleaved rounds (shared machine: the ratios are what to read); a variant's
figures are medians over rounds. tokens/s = answer tokens of all requests / wall time of the
load; latency = a request's wall time from send to its full answer. Prints a table, then one
JSON line: mixed_over_base, mixed_over_one_task (throughput ratios; targets >= 0.85 and >= 2),
step_mixed_over_base (decode steps per second, mixed over base), tokens/s and p50/p99 latency (s)
of each variant.

    python bench/serve.py [--model smollm2|tiny] [--rounds 2] [--clients 64] [--requests 2]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench._common import interleaved_medians  # noqa: E402
from cgc_lora_jax.layers import CGCLoRAConfig  # noqa: E402
from cgc_lora_jax.merge import merge_task  # noqa: E402
from cgc_lora_jax.models.generate import generate  # noqa: E402
from cgc_lora_jax.models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402
from cgc_lora_jax.multitask.server import MultiTaskServer  # noqa: E402
from cgc_lora_jax.params import split_params  # noqa: E402
from cgc_lora_jax.run import BaseModel, save_adapters  # noqa: E402
from cgc_lora_jax.serve.app import BackgroundServer, create_app  # noqa: E402
from cgc_lora_jax.serve.engine import BASE_MODEL_ID, Engine, EngineConfig  # noqa: E402

SHAPES = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0),
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32),
}
TASKS = tuple(f"task{i}" for i in range(8))
LORA = CGCLoRAConfig(num_tasks=len(TASKS), num_common=8, common_rank=2, specific_rank=2,
                     targets=r"(q|k|v|o|gate|up|down)_proj$")


class IdTokenizer:
    """A stand-in tokenizer for random weights: one character per id (prompts go as ids)."""

    eos_token_id, pad_token_id, bos_token_id = 0, 0, None

    def decode(self, ids) -> str:
        return "".join(chr(0x4E00 + int(i) % 20000) for i in ids)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [(ord(c) - 0x4E00) % 20000 for c in text]


def random_tree(shapes, rng, std=0.02):
    return jax.tree.map(lambda s: jnp.asarray((std * rng.standard_normal(s.shape)).astype(np.float32)), shapes)


def build_server(model_name: str, folder: Path) -> MultiTaskServer:
    """The random base once, the 8 tasks' random adapters saved as an adapter set and attached."""
    config = LlamaConfig(**SHAPES[model_name], rms_norm_eps=1e-5, tie_word_embeddings=True)
    plain, adapted = LlamaForCausalLM(config), LlamaForCausalLM(config, lora=LORA)
    shapes = jax.eval_shape(adapted.init, jax.random.key(0), jnp.ones((1, 4), jnp.int32), None,
                            jnp.zeros((1,), jnp.int32))["params"]
    rng = np.random.default_rng(0)
    base_shapes, adapter_shapes = split_params(shapes)
    info = {"path": f"random:{model_name}", "fingerprint": f"bench-{model_name}"}
    base = BaseModel("llama", plain, random_tree(base_shapes, rng), IdTokenizer(), info)
    meta = {"lora": dataclasses.asdict(LORA), "task_vocab": list(TASKS), "family": "llama", "base": info,
            "model": {"dtype": "float32"}}
    save_adapters(folder, random_tree(adapter_shapes, rng, std=0.05), meta)
    return MultiTaskServer(base, {"run": folder})


class OneTaskEngine(Engine):
    """Today's pattern behind the same HTTP app: one task at a time, merged weights, static batches."""

    MIN_BATCH = 4

    def __init__(self, server, config, prompt_len: int, answer_len: int, max_batch: int):
        # The slot groups the parent builds go unused: keep them small.
        small = dataclasses.replace(config, base_slots=config.prefill_batch, slots=config.prefill_batch)
        super().__init__(server, small)
        self.max_batch, self.prompt_len, self.answer_len = max_batch, prompt_len, answer_len
        adapter_set = server.clusters["run"]
        self.plain, self.params, self.lora = server.base.model, adapter_set.params, adapter_set.lora
        self.merged_task, self.merged = None, None

    def batch_rows(self, n: int) -> int:
        return min(max(1 << max(n - 1, 0).bit_length(), self.MIN_BATCH), self.max_batch)

    def warm_up(self) -> float:
        start = time.perf_counter()
        rows = self.MIN_BATCH
        while True:
            self._generate([[1] * self.prompt_len] * rows, 0)
            if rows >= self.max_batch:
                return time.perf_counter() - start
            rows *= 2

    def _generate(self, prompts, task_id):
        if self.merged_task != task_id:
            self.merged, self.merged_task = jax.block_until_ready(merge_task(self.params, task_id, self.lora)), task_id
        rows = self.batch_rows(len(prompts))
        ids = np.zeros((rows, self.prompt_len), np.int32)
        ids[: len(prompts)] = prompts
        return np.asarray(generate(self.plain, self.merged, ids, None, None, max_new_tokens=self.answer_len,
                                   eos_token_id=None, pad_token_id=0))[: len(prompts)]

    def _run(self) -> None:
        group = self.groups["run"]
        while True:
            with self._lock:
                while not (self._stopping or group.waiting):
                    self._lock.wait()
                if self._stopping:
                    return
                task_id = group.waiting[0].route[1]
                batch = [gen for gen in group.waiting if gen.route[1] == task_id][: self.max_batch]
                for gen in batch:
                    group.waiting.remove(gen)
                self._waiting -= len(batch)
            for gen, answer in zip(batch, self._generate([gen.prompt_ids for gen in batch], task_id)):
                for token in answer:
                    if gen.cancelled or gen.push(int(token)):
                        break


async def load(url: str, models: list[str], clients: int, requests: int, prompt: list[int], answer_len: int, seed: int):
    """`clients` concurrent clients, `requests` each in turn; (wall seconds, latencies, answer tokens)."""
    rng = np.random.default_rng(seed)
    plan = [[models[i] for i in rng.integers(len(models), size=requests)] for _ in range(clients)]
    latencies, tokens = [], 0

    async def client(session, models_in_turn):
        nonlocal tokens
        for model in models_in_turn:
            start = time.perf_counter()
            response = await session.post(f"{url}/v1/completions", json={
                "model": model, "prompt": prompt, "max_tokens": answer_len, "temperature": 0, "ignore_eos": True})
            body = response.json()
            assert response.status_code == 200, body
            latencies.append(time.perf_counter() - start)
            tokens += body["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session, p) for p in plan))
        return time.perf_counter() - start, latencies, tokens


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=1, help="requests per client per round")
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--answer-len", type=int, default=32)
    parser.add_argument("--prefill-batch", type=int, default=8)
    parser.add_argument("--one-task-batch", type=int, default=16)
    args = parser.parse_args(argv)

    context = args.prompt_len + args.answer_len
    config = EngineConfig(slots=args.slots, context=context, prefill_batch=args.prefill_batch,
                          min_bucket=args.prompt_len, max_prompt=args.prompt_len,
                          max_queue=4 * args.clients * args.requests)  # one prefill bucket
    with tempfile.TemporaryDirectory() as tmp:
        server = build_server(args.model, Path(tmp) / "adapters")
    fused = Engine(server, config)
    one_task = OneTaskEngine(server, config, args.prompt_len, args.answer_len, args.one_task_batch)
    for line in fused.memory_report():
        print(line)
    for name, engine in (("fused engine", fused), ("one-task engine", one_task)):
        print(f"{name}: compiled in {engine.warm_up():.1f} s", flush=True)
        engine.start(warm_up=False)
    run, bare = fused.groups["run"], fused.groups[BASE_MODEL_ID]
    run.task_ids[:] = np.arange(args.slots) % len(TASKS)  # every step mixes the 8 tasks
    steps = interleaved_medians({"mixed": lambda: run.slots.step(run.task_ids, run.sampling, run.counts),
                                 "base": lambda: bare.slots.step(bare.task_ids, bare.sampling, bare.counts)}, rounds=7)
    print(f"decode step, {args.slots} slots: mixed {steps['mixed']:.3f} s, base {steps['base']:.3f} s", flush=True)
    prompt = np.random.default_rng(1).integers(1, SHAPES[args.model]["vocab_size"], args.prompt_len).tolist()
    variants = {"mixed": (fused, list(TASKS)), "base": (fused, [BASE_MODEL_ID]), "one_task": (one_task, list(TASKS))}
    results = {name: [] for name in variants}
    with BackgroundServer(create_app(fused)) as fused_http, BackgroundServer(create_app(one_task)) as one_task_http:
        urls = {fused: fused_http.url, one_task: one_task_http.url}
        for engine, models in variants.values():  # the HTTP path, untimed
            asyncio.run(load(urls[engine], models, 2, 1, prompt, args.answer_len, seed=0))
        for round_index in range(1, args.rounds + 1):
            for name, (engine, models) in variants.items():
                seconds, latencies, tokens = asyncio.run(load(urls[engine], models, args.clients, args.requests,
                                                              prompt, args.answer_len, seed=round_index))
                results[name].append((tokens / seconds, np.percentile(latencies, 50), np.percentile(latencies, 99)))
                print(f"round {round_index} {name}: {tokens / seconds:.1f} tokens/s", flush=True)
    fused.stop()
    one_task.stop()

    figures = {name: [float(np.median([r[k] for r in rows])) for k in range(3)] for name, rows in results.items()}
    print(f"\n{args.clients} clients x {args.requests} requests, prompt {args.prompt_len} + answer "
          f"{args.answer_len} tokens, {args.model} shapes, {args.slots} slots; medians of {args.rounds} rounds")
    print(f"| variant | tokens/s | p50 latency (s) | p99 latency (s) |\n|---|---|---|---|")
    for name, (rate, p50, p99) in figures.items():
        print(f"| {name} | {rate:.1f} | {p50:.2f} | {p99:.2f} |")
    summary = {"model": args.model, "mixed_over_base": figures["mixed"][0] / figures["base"][0],
               "mixed_over_one_task": figures["mixed"][0] / figures["one_task"][0],
               "step_mixed_over_base": steps["base"] / steps["mixed"]}
    for name, (rate, p50, p99) in figures.items():
        summary.update({f"{name}_tokens_per_s": rate, f"{name}_p50_s": p50, f"{name}_p99_s": p99})
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
