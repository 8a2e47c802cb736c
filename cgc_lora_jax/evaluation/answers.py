"""The one path from prompts to answers, for evaluation, the baselines and the 1+N server.

    prompts  (EncodedSplit of generation prompts: encode_split(..., for_prediction=True), which
              truncates each prompt to max_source_len - 1 ids, or `prompts_from_texts`)
      -> `rows` ordered by prompt length (stable), so that prompts of similar length share a
         batch and its padded width: med8's 2-shot in-context prompts (120-477 tokens, in file
         order) fill about 10% fewer positions
      -> batches of them, left-padded (batching.prompt_batches): batch_size rows, the last
         one fitted to the smallest 2^k or 3 * 2^(k-1) >= its prompts (at least 8 rows; filler
         rows -1 complete it), so few batch shapes are compiled and a task's 20 prompts decode
         as 24 rows, not 64
      -> models.generate.generate (jit KV-cache decoding; greedy unless `sampling` says otherwise)
      -> each row's new ids cut at the first stop id (eos, and pad when decoding to text)
      -> tokenizer.decode(...).strip(), or the ids themselves when `tokenizer` is None

    answers = generate_answers(model, params, prompts, rows, GenerationSettings(16, 64, 32), tokenizer)
    answers[row]                                                        # "颜色：红色"

with_task_ids=True gives each row its task ID (a model with adapters: fused mixed-task serving);
a plain model (merged weights, or the base alone) takes none.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence

import jax
import numpy as np

from cgc_lora_jax.data.batching import prompt_batches
from cgc_lora_jax.data.formatting import EncodedSplit, PromptFormat, truncate


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """How prompts are batched and how long answers may grow (a config's eval / data fields)."""

    batch_size: int  # prompts per generation batch
    max_new_tokens: int  # answer length cap, in tokens
    pad_multiple: int = 64  # prompt widths round up to a multiple of this (few jit shapes)

    @classmethod
    def from_config(cls, cfg) -> GenerationSettings:
        """Prompts are padded to a multiple of generate's smallest bucket, not to data.pad_multiple
        (a training shape): generate pads them to the next power of two anyway, and a coarse
        multiple would push a 250-token prompt batch to 320 and so into the 512-token program."""
        from cgc_lora_jax.models.generate import MIN_PROMPT_BUCKET

        return cls(cfg.eval.batch_size, cfg.eval.max_new_tokens, MIN_PROMPT_BUCKET)


def stop_ids(tokenizer) -> list[int]:
    """The ids that end a text answer: eos, and pad (a row that stopped continues with pad)."""
    return sorted({i for i in (tokenizer.eos_token_id, getattr(tokenizer, "pad_token_id", None)) if i is not None})


def cut_at_stop(ids, stops) -> list[int]:
    """`ids` up to (without) the first id in `stops`."""
    ids = [int(t) for t in np.asarray(ids)]
    stops = set(stops)
    return ids[: next((i for i, t in enumerate(ids) if t in stops), len(ids))]


def decode_answer(tokenizer, ids) -> str:
    return tokenizer.decode(cut_at_stop(ids, stop_ids(tokenizer))).strip()


def prompts_from_texts(texts: Sequence[str], tokenizer, family: str, task_id: int,
                       max_source_len: int = 1024) -> EncodedSplit:
    """Generation prompts of raw texts, formatted (and truncated) as training formats them."""
    fmt = PromptFormat.for_tokenizer(family, tokenizer)
    rows, cut = [], Counter()
    for text in texts:
        prompt, _, parts = truncate(tokenizer.encode(text, add_special_tokens=False), [], max_source_len, 3)
        cut.update(parts)
        rows.append(fmt.prompt_ids(prompt))
    return prompts_from_ids(rows, fmt.pad_id, task_id, cut)


def prompts_from_ids(rows: Sequence[Sequence[int]], pad_id: int, task_id: int, truncated=None) -> EncodedSplit:
    """Generation prompts given as id lists, all of one task."""
    return EncodedSplit([np.asarray(r, np.int32) for r in rows], None, np.full(len(rows), task_id, np.int32),
                        [str(i) for i in range(len(rows))], pad_id, truncated or Counter())


def generate_answers(model, params, prompts: EncodedSplit, rows, settings: GenerationSettings, tokenizer=None, *,
                     eos_token_id=None, with_task_ids: bool = False, bar=None, **sampling) -> dict[int, str | list[int]]:
    """{row: answer} for the prompts `rows` of `prompts`, in batches of settings.batch_size.

    tokenizer: decode each answer to text (cut at eos or pad); None: return the new ids cut at
    eos. eos_token_id: default tokenizer.eos_token_id. sampling: do_sample, temperature, top_p,
    top_k, rng of models.generate.generate.
    """
    from cgc_lora_jax.models.generate import generate

    eos = eos_token_id if eos_token_id is not None or tokenizer is None else tokenizer.eos_token_id
    stops = stop_ids(tokenizer) if tokenizer is not None else np.atleast_1d(eos if eos is not None else []).tolist()
    answers = {}
    rows = np.asarray(rows, np.int64)
    rows = rows[np.argsort(prompts.lengths[rows], kind="stable")]
    for batch in prompt_batches(prompts, settings.batch_size, pad_multiple=settings.pad_multiple, rows=rows,
                                fit_last=True):
        new_ids = generate(model, params, batch.input_ids, batch.attention_mask,
                           batch.task_ids if with_task_ids else None, max_new_tokens=settings.max_new_tokens,
                           eos_token_id=eos, pad_token_id=prompts.pad_id, **sampling)
        for index, ids in zip(batch.sample_index, jax.device_get(new_ids)):
            if index >= 0:
                ids = cut_at_stop(ids, stops)
                answers[int(index)] = tokenizer.decode(ids).strip() if tokenizer is not None else ids
        if bar is not None:
            bar.update(int((batch.sample_index >= 0).sum()))
    return answers
