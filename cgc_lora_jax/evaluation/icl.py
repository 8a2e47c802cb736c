"""In-context prompting baseline: the base model, no adapters, k solved examples in the prompt.

Our stand-in for the paper's ChatGPT row. For a query q of task t, k training examples
e_1 .. e_k of the same task t (a seeded draw, never the query's own input) go before it:

    prompt = e_1.input + e_1.target + SEP + ... + e_k.input + e_k.target + SEP + q.input

with SEP = a blank line. PromptCBLUE inputs end with their answer cue ("答：" and the like), so
each example reads as a solved instance and the query as the one to solve. The draw for a query
uses numpy.random.default_rng([seed, crc32(task), crc32(sample_id)]): the same seed gives the
same prompts, whatever the order of the queries.

When the prompt is longer than the token budget (data.max_source_len - 1, what the prompt
formatting keeps), the earliest examples are dropped first, so the query itself is never cut
(unless it alone exceeds the budget); `IclRecords.dropped` counts the examples dropped.

    records = icl_records(test_records, train_records, shots=3, seed=0)
    scores = run_icl(load_config("demo_tiny", ["data.max_source_len=224"]), "runs/icl", shots=3)
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

SEPARATOR = "\n\n"  # between the solved examples and before the query


def icl_prompt(examples: Sequence[dict], query_input: str) -> str:
    """The examples (input immediately followed by target), then the query's input."""
    return "".join(f"{ex['input']}{ex['target']}{SEPARATOR}" for ex in examples) + query_input


def _crc(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def choose_examples(pool: Sequence[dict], query: dict, shots: int, seed: int) -> list[dict]:
    """`shots` distinct examples from `pool` (the query's task's training records), never one
    with the query's input; fewer when the pool is smaller. Deterministic in (seed, query)."""
    candidates = [ex for ex in pool if ex["input"] != query["input"]]
    rng = np.random.default_rng([seed, _crc(query["task_dataset"]), _crc(str(query["sample_id"]))])
    picks = rng.choice(len(candidates), size=min(shots, len(candidates)), replace=False)
    return [candidates[i] for i in picks]


@dataclasses.dataclass
class IclRecords:
    records: list[dict]  # the queries with `input` replaced by the in-context prompt
    examples: list[list[str]]  # per query, the sample_ids of the examples kept, in prompt order
    dropped: int  # examples left out to fit the token budget, over all queries


def icl_records(queries: Sequence[dict], train: Sequence[dict], shots: int, seed: int,
                count_tokens: Callable[[str], int] | None = None, max_tokens: int | None = None) -> IclRecords:
    """Every query with its in-context prompt (see the module docstring).

    count_tokens / max_tokens: drop the earliest examples while the prompt has more tokens.
    """
    if shots < 0:
        raise ValueError(f"shots={shots}: must be >= 0")
    by_task: dict[str, list[dict]] = {}
    for example in train:
        by_task.setdefault(example["task_dataset"], []).append(example)
    records, kept, dropped = [], [], 0
    for query in queries:
        pool = by_task.get(query["task_dataset"], [])
        if shots and not pool:
            raise ValueError(f"the training split has no example of task {query['task_dataset']!r}")
        examples = choose_examples(pool, query, shots, seed) if shots else []
        prompt = icl_prompt(examples, query["input"])
        while examples and max_tokens is not None and count_tokens(prompt) > max_tokens:
            examples, dropped = examples[1:], dropped + 1
            prompt = icl_prompt(examples, query["input"])
        records.append({**query, "input": prompt})
        kept.append([str(ex["sample_id"]) for ex in examples])
    return IclRecords(records, kept, dropped)


def run_icl(cfg, out_dir: str | Path, shots: int, seed: int | None = None, split: str | None = None) -> dict[str, float]:
    """Prompt the config's base model (no adapters) with `shots` examples per query of `split`
    (default cfg.eval.split), greedy; writes OUT like an evaluated run (predictions with the
    original inputs, scores, table, chart) plus icl.json (settings and the examples used)."""
    from tqdm.auto import tqdm

    from cgc_lora_jax.evaluation.answers import GenerationSettings, generate_answers
    from cgc_lora_jax.evaluation.evaluate import benchmark_of, split_file, write_results
    from cgc_lora_jax.run import answering_model_config, encode, load_base, read_data

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    split = split or cfg.eval.split
    seed = cfg.train.seed if seed is None else seed
    splits, vocab = read_data(cfg.data, out_dir, seed=cfg.train.seed, splits=("train", split),
                              prediction_splits=(split,))
    queries, train = list(splits.datasets[split]), list(splits.datasets["train"])
    base = load_base(answering_model_config(cfg), lora=None, workdir=out_dir)
    count = lambda text: len(base.tokenizer.encode(text, add_special_tokens=False))
    icl = icl_records(queries, train, shots, seed, count, cfg.data.max_source_len - 1)
    if icl.dropped:
        print(f"dropped {icl.dropped} of {shots * len(queries)} examples to keep prompts within "
              f"data.max_source_len={cfg.data.max_source_len} tokens")
    prompts = encode(cfg.data, icl.records, base, vocab, for_prediction=True)
    bar = tqdm(total=len(queries), desc=f"icl {split} ({shots}-shot)", unit="sample")
    answers = generate_answers(base.model, base.params, prompts, np.arange(len(queries)), GenerationSettings.from_config(cfg),
                               base.tokenizer, bar=bar)
    bar.close()
    settings = {"shots": shots, "seed": seed, "split": split, "model": cfg.model.to_dict(),
                "dropped_examples": icl.dropped, "first_prompt": icl.records[0]["input"] if queries else None}
    (out_dir / "icl.json").write_text(json.dumps({"settings": settings, "examples": dict(
        zip((str(q["sample_id"]) for q in queries), icl.examples))}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return write_results(out_dir, split, queries, answers, benchmark_of(cfg.data), out_dir.name,
                         split_file(cfg.data, out_dir, split))
