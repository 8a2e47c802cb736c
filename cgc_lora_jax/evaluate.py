"""Generate answers for a trained run and score them.

Two ways to serve the adapters, the same answers either way (up to float rounding):
  merged (default)  per task, the task's experts folded into the base weights (paper eq. 8) and
                    that task's prompts generated in batches at the base model's cost;
  fused             one pass over mixed-task batches with the adapters applied on the fly.

Predictions are written in the PromptCBLUE submission format (each input record with `target`
replaced by the model's output) to WORKDIR/predictions_<split>.jsonl, the scores to
WORKDIR/scores_<split>.json ({task: score, "average": mean}) and a Markdown table beside it.

    scores = evaluate_run("runs/demo", split="test")
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from cgc_lora_jax.base_model import load_base
from cgc_lora_jax.batching import make_batch
from cgc_lora_jax.checkpoint import load_adapters
from cgc_lora_jax.merge import merge_task
from cgc_lora_jax.params import join_params, split_params
from cgc_lora_jax.scoring import score_records
from cgc_lora_jax.trainer import encode, lora_config, read_data


def load_run_config(workdir: Path) -> ml_collections.ConfigDict:
    path = workdir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {workdir} is not a training run's workdir")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def _stop_ids(tokenizer) -> list[int]:
    return sorted({i for i in (tokenizer.eos_token_id, getattr(tokenizer, "pad_token_id", None)) if i is not None})


def decode_answer(tokenizer, ids) -> str:
    ids = list(np.asarray(ids))
    stops = set(_stop_ids(tokenizer))
    cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return tokenizer.decode(ids[:cut]).strip()


def _generate_rows(model, params, split, rows, batch_size, cfg, tokenizer, fused: bool) -> dict[int, str]:
    from models.generate import generate

    answers = {}
    for start in range(0, len(rows), batch_size):
        chunk = np.full(batch_size, -1, np.int64)
        chunk[: len(rows[start : start + batch_size])] = rows[start : start + batch_size]
        batch = make_batch(split, chunk, pad_multiple=cfg.data.pad_multiple, padding_side="left")
        new_ids = generate(
            model, params, jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask),
            jnp.asarray(batch.task_ids) if fused else None, max_new_tokens=cfg.eval.max_new_tokens,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=split.pad_id,
        )
        for index, ids in zip(chunk, jax.device_get(new_ids)):
            if index >= 0:
                answers[int(index)] = decode_answer(tokenizer, ids)
    return answers


def markdown_table(scores: dict[str, float], title: str) -> str:
    tasks = [t for t in scores if t != "average"]
    header = "| run | " + " | ".join(tasks) + " | Avg. |"
    line = "|---" * (len(tasks) + 2) + "|"
    row = f"| {title} | " + " | ".join(f"{100 * scores[t]:.2f}" for t in tasks) + f" | {100 * scores['average']:.2f} |"
    return "\n".join([header, line, row]) + "\n"


def evaluate_run(workdir: str | Path, split: str = "test", fused: bool = False) -> dict[str, float]:
    workdir = Path(workdir)
    cfg = load_run_config(workdir)
    splits, vocab = read_data(cfg, workdir, splits=(split,), prediction_splits=(split,))
    records = list(splits.datasets[split])
    lora = lora_config(cfg, len(vocab.tasks))
    base = load_base(cfg.model, lora=lora, workdir=workdir)
    adapters, meta = load_adapters(workdir / "adapters", jax.device_get(split_params(base.params)[1]))
    if meta["base"]["fingerprint"] != base.info["fingerprint"]:
        raise ValueError(f"{workdir}/adapters were trained on {meta['base']['path']}, not on {base.info['path']}")
    params = join_params(split_params(base.params)[0], adapters)
    prompts = encode(cfg, records, base, vocab, for_prediction=True)

    answers: dict[int, str] = {}
    bar = tqdm(total=len(records), desc=f"eval {split}", unit="sample")
    if fused:
        answers = _generate_rows(base.model, params, prompts, np.arange(len(records)), cfg.eval.batch_size, cfg, base.tokenizer, True)
        bar.update(len(records))
    else:
        plain = base.model.clone(lora=None)
        for task_id, task in enumerate(vocab.tasks):
            rows = np.flatnonzero(prompts.task_ids == task_id)
            if len(rows) == 0:
                continue
            bar.set_postfix(task=task)
            merged = merge_task(params, task_id, lora)
            answers.update(_generate_rows(plain, merged, prompts, rows, cfg.eval.batch_size, cfg, base.tokenizer, False))
            bar.update(len(rows))
    bar.close()

    predictions = [{**record, "target": answers[i]} for i, record in enumerate(records)]
    pred_path = workdir / f"predictions_{split}.jsonl"
    pred_path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions), encoding="utf-8")
    benchmark = "demo" if cfg.data.format == "demo" else cfg.data.format
    if not all(r["target"] for r in records):
        print(f"{split} has no gold targets: predictions written to {pred_path}, nothing scored")
        return {}
    scores = score_records(predictions, records, benchmark=benchmark)
    (workdir / f"scores_{split}.json").write_text(json.dumps(scores, indent=2, ensure_ascii=False) + "\n")
    table = markdown_table(scores, workdir.name)
    (workdir / f"scores_{split}.md").write_text(table, encoding="utf-8")
    print(table)
    for record in predictions[:3]:
        print(f"[{record['task_dataset']}] {record['input'][-40:]!r} -> {record['target']!r}")
    return scores
