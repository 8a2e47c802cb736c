"""Scorer for the Firefly (firefly-train-1.1M) tasks the CGC-LoRA paper evaluates.

Firefly has no official scorer, so this module fixes one; the metrics are those the paper names:

    Rouge-L F   TextCorrection, Summary              mean over samples
    micro-F1    KeywordRecognition, MRC, NER         set micro-F1 summed over samples
    macro-F1    TextMatching, NLI, SentimentAnalyze  mean F1 over labels seen in gold or pred

Formulas are in `metrics`. How each target (gold and prediction alike) is parsed:

- Rouge-L: the stripped text, tokenised and scored exactly as PromptCBLUE's MedDG (one CJK
  ideograph or punctuation mark per token, lower-cased Latin words; an empty side becomes
  `无 。`; F = 2PR / (P + R + 1e-8), so identical texts score 0.999999995). One Rouge-L for both
  benchmarks keeps their numbers comparable.
- Classification: the label is the whole stripped text (`中立`, `积极`, ...), as PromptCBLUE's
  CHIP-CTC; any other string is one more label with F1 = 0.
- Answer lists (KeywordRecognition, NER): each line is read separately. A line with a colon
  (`：` or `:`) is `key：values`; the values are split on `，` `,` `、` `；` `;`. Each value is
  stripped; empty values and no-answer phrases (`NO_ANSWER`, e.g. `不存在实体`) give no item, so
  a correct "no entity" answer adds no true positive, as in PromptCBLUE.
  - KeywordRecognition items are the values (the key, e.g. `关键词`, is ignored); a line
    without a colon is a list of values itself.
  - NER items are (key, value), i.e. (entity type, mention); a line without a colon gives
    ("", value) items.
  Duplicates count once; order does not matter.
- MRC: one item, the whole stripped answer; an empty answer gives none.

Usage::

    score_task("NER", gold_texts=["人名：张三，李四"], pred_texts=["人名：张三"])  # 0.666...
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from cgc_lora_jax.scoring import metrics

ROUGE_TASKS = ("TextCorrection", "Summary")
MICRO_F1_TASKS = ("KeywordRecognition", "MRC", "NER")
MACRO_F1_TASKS = ("TextMatching", "NLI", "SentimentAnalyze")
TASK_NAMES = ROUGE_TASKS + MICRO_F1_TASKS + MACRO_F1_TASKS
# The 8 Firefly (firefly-train-1.1M `kind`) tasks of the CGC-LoRA paper, in the paper's order.
PAPER_TASKS = ("TextCorrection", "Summary", "KeywordRecognition", "TextMatching", "SentimentAnalyze", "MRC",
               "NER", "NLI")
PAPER_SPLIT_SIZES = {"train": 1800, "dev": 300, "test": 300}  # the paper's samples per task and split
NO_ANSWER = frozenset({"无", "没有", "不存在", "无实体", "没有实体", "不存在实体", "无关键词",
                       "没有关键词"})

_KEY_SEPARATOR = re.compile(r"[：:]")
_VALUE_SEPARATOR = re.compile(r"[，,、；;]")


def _key_values(text: str) -> list[tuple[str, str]]:
    """(key, value) for every value of every line; key is "" on a line without a colon."""
    pairs = []
    for line in text.split("\n"):
        parts = _KEY_SEPARATOR.split(line, maxsplit=1)
        key, values = (parts[0].strip(), parts[1]) if len(parts) == 2 else ("", line)
        for value in _VALUE_SEPARATOR.split(values):
            value = value.strip()
            if value and value not in NO_ANSWER:
                pairs.append((key, value))
    return pairs


def parse_keywords(text: str) -> frozenset:
    return frozenset((value,) for _, value in _key_values(text))


def parse_entities(text: str) -> frozenset:
    return frozenset(_key_values(text))


def parse_answer_span(text: str) -> frozenset:
    answer = text.strip()
    return frozenset({(answer,)}) if answer else frozenset()


_SET_PARSERS = {"KeywordRecognition": parse_keywords, "MRC": parse_answer_span,
                "NER": parse_entities}


def canonical_task(name: str) -> str:
    """The task name itself; KeyError for a name that is not a scored Firefly task."""
    if name not in TASK_NAMES:
        raise KeyError(name)
    return name


def score_task(task: str, gold_texts: Sequence[str], pred_texts: Sequence[str],
               choices: Sequence[Any] | None = None) -> float:
    """One task's score from raw gold and predicted targets (`choices` is unused)."""
    task = canonical_task(task)
    if len(gold_texts) != len(pred_texts):
        raise ValueError(f"{len(gold_texts)} gold targets but {len(pred_texts)} predictions")
    if task in ROUGE_TASKS:
        return metrics.mean_rouge_l_chinese(
            (pred.strip(), gold.strip()) for pred, gold in zip(pred_texts, gold_texts))
    if task in MACRO_F1_TASKS:
        return metrics.macro_f1([t.strip() for t in gold_texts], [t.strip() for t in pred_texts])
    parser = _SET_PARSERS[task]
    return metrics.set_micro_f1([parser(t) for t in gold_texts], [parser(t) for t in pred_texts])
