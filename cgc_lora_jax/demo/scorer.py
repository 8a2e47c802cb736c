"""The demo's scorer (the interface of `cgc_lora_jax.scoring`'s benchmark modules: TASK_NAMES,
canonical_task, score_task), each score in [0, 1]:

    ColourExtraction        set micro-F1 over colour names (`metrics.set_micro_f1`)
    CategoryClassification  exact-match accuracy of the stripped label
    DigitsToChinese         mean character Rouge-L F (`metrics.rouge_l_chinese`, one token per
                            CJK character; identical texts score 0.999999995)

    score_task("ColourExtraction", ["颜色：红色，蓝色"], ["颜色：红色"])   # 0.666...
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from cgc_lora_jax.demo.splits import known_task
from cgc_lora_jax.scoring import metrics

TASK_NAMES = ("ColourExtraction", "CategoryClassification", "DigitsToChinese")
NO_COLOUR = "无"  # the ColourExtraction answer when the sentence names no colour
_ITEM_SEPARATOR = re.compile(r"[，,、；;]")


def parse_colours(text: str) -> frozenset:
    """The colour names of an answer "颜色：红色，蓝色" (the part before a colon is ignored;
    "无" and blanks give nothing)."""
    answer = re.split(r"[：:]", text.strip(), maxsplit=1)[-1]
    items = (item.strip() for item in _ITEM_SEPARATOR.split(answer))
    return frozenset(item for item in items if item and item != NO_COLOUR)


def canonical_task(name: str) -> str:
    """The task name itself; KeyError for a name that is not a demo task."""
    return known_task(name, TASK_NAMES)


def score_task(task: str, gold_texts: Sequence[str], pred_texts: Sequence[str],
               choices: Sequence | None = None) -> float:
    """One demo task's score from raw gold and predicted targets (`choices` is unused)."""
    task = canonical_task(task)
    if len(gold_texts) != len(pred_texts):
        raise ValueError(f"{len(gold_texts)} gold targets but {len(pred_texts)} predictions")
    if not gold_texts:
        return 0.0
    if task == "ColourExtraction":
        return metrics.set_micro_f1([parse_colours(t) for t in gold_texts],
                                    [parse_colours(t) for t in pred_texts])
    if task == "CategoryClassification":
        hits = sum(gold.strip() == pred.strip() for gold, pred in zip(gold_texts, pred_texts))
        return hits / len(gold_texts)
    return metrics.mean_rouge_l_chinese(
        (pred.strip(), gold.strip()) for pred, gold in zip(pred_texts, gold_texts))
