"""The official PromptCBLUE scorer (16-task version): post-processing of model text and metrics.

Every raw target, gold and prediction alike, is first normalised (the first 100 ASCII `:` become
`：`, then the first 100 `,` become `，`, then the first 100 `;` become `；`), then parsed by the
task's parser below (the same parser on both sides), then scored with one metric over the
task's samples (formulas in `metrics`):

    set micro-F1   CMeIE, CHIP-CDN, CHIP-CDEE, CHIP-MDCFNPC, CMeEE-V2, IMCS-V2-NER, IMCS-V2-SR
    macro-F1       CHIP-CTC, KUAKE-QIC, IMCS-V2-DAC            (labels observed in gold or pred)
    weighted-F1    CHIP-STS, KUAKE-IR, KUAKE-QTR, KUAKE-QQR    (sklearn "weighted avg")
    Rouge-L F      MedDG (per sample), IMCS-V2-MRG (per gold report section, pooled)

The 8 MOELoRA/CGC-LoRA tasks follow the official scorer's rules (its post-processing and
metrics, as summarised for the project in SCORING.md beside the PromptCBLUE samples, which are
not part of this repository) rule by rule. The
other 8 follow the public 16-task scorer (michael-wzhu/PromptCBLUE `src/for_eval/
post_generate_process.py` and `src/for_evaluation/run_evaluation.py`): entity lines
`{type}实体：a，b` for the NER tasks, `finding：label` lines with fallback label
`无法根据上下文确定病人是否患有该症状` for IMCS-V2-SR, the stripped text as label for the
classification tasks, with `相同`/`不同` read as `是的`/`不是` for CHIP-STS. That scorer's
weighted-F1 tasks are labelled "Micro-F1" on the leaderboard, but its code returns sklearn's
"weighted avg" F1, which is what is computed here. `CMeIE-V2` (the 18-task name) is scored and
reported as `CMeIE`.

Usage::

    score_task("CHIP-CDN", gold_texts=["a，b"], pred_texts=["a，a，c，b"], choices=[["a", "b"]])  # 1.0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from cgc_lora_jax.scoring import metrics

TASK_ALIASES = {"CMeIE-V2": "CMeIE"}
CDEE_FIELDS = ("主体词", "发生状态", "描述词", "解剖部位")
CDEE_LIST_FIELDS = ("描述词", "解剖部位")
MRG_SECTIONS = ("主诉", "现病史", "辅助检查", "既往史", "诊断", "建议")
MDCFNPC_FALLBACK = "无实际意义的不标注或者和病人当前的状态独立不标注"
IMCS_SR_FALLBACK = "无法根据上下文确定病人是否患有该症状"


def normalize_punctuation(text: str) -> str:
    """The first 100 ASCII `:`, then `,`, then `;` become full-width; later ones stay ASCII."""
    return text.replace(":", "：", 100).replace(",", "，", 100).replace(";", "；", 100)


def parse_cmeie(text: str, choices: Sequence[Any]) -> frozenset:
    """(predicate, subject, object) triples; the predicate is the line's text before
    `关系的头尾实体对` minus its first two characters (meant to be `具有`), never checked."""
    triples = set()
    for line in text.split("\n"):
        predicate = line.split("关系的头尾实体对")[0][2:].strip()
        line = line.replace(f"具有{predicate}关系的头尾实体对如下：", "")
        for piece in line.split("。"):
            parts = piece.split("，尾实体为")
            if len(parts) < 2:
                continue
            subject = parts[0].replace("头实体为", "").strip()
            obj = parts[1].replace("尾实体为", "").strip()
            triples.add((predicate, subject, obj))
    return frozenset(triples)


def parse_cdn(text: str, choices: Sequence[Any]) -> frozenset:
    """The `，`-separated terms of the last line that are exactly one of the candidates."""
    terms = (term.strip() for term in text.split("\n")[-1].split("，"))
    return frozenset((term,) for term in terms if term and term in choices)


def parse_cdee(text: str, choices: Sequence[Any]) -> frozenset:
    """One (主体词, 发生状态, 描述词 tuple, 解剖部位 tuple) event per line after the first."""
    events = set()
    for line in text.split("\n")[1:]:
        event: dict[str, Any] = {}
        for attribute in line.split("；"):
            for name in CDEE_FIELDS:
                prefix = f"{name}："
                if not attribute.startswith(prefix):
                    continue
                attribute = attribute.replace(prefix, "").strip()  # later names see this text
                if name in CDEE_LIST_FIELDS:
                    event[name] = tuple(v.strip() for v in attribute.split("，") if v.strip())
                else:
                    event[name] = attribute
        events.add((event.get("主体词", ""), event.get("发生状态", ""),
                    event.get("描述词", ()), event.get("解剖部位", ())))
    return frozenset(events)


def _parse_finding_labels(text: str, choices: Sequence[Any], fallback: str) -> frozenset:
    """(finding, label) per line after the first with exactly one `：`; an unknown label
    (the part after `：`, not stripped) becomes `fallback`."""
    pairs = set()
    for line in text.split("\n")[1:]:
        parts = line.split("：")
        if len(parts) != 2:
            continue
        finding, label = parts
        pairs.add((finding.strip(), label if label in choices else fallback))
    return frozenset(pairs)


def parse_mdcfnpc(text: str, choices: Sequence[Any]) -> frozenset:
    return _parse_finding_labels(text, choices, MDCFNPC_FALLBACK)


def parse_imcs_sr(text: str, choices: Sequence[Any]) -> frozenset:
    return _parse_finding_labels(text, choices, IMCS_SR_FALLBACK)


def parse_entities(text: str, choices: Sequence[Any]) -> frozenset:
    """(mention, type) for every `，`-separated mention on lines starting with `{type}实体`."""
    lines = text.split("\n")
    entities = set()
    for entity_type in choices:
        for line in lines:
            if line.startswith(f"{entity_type}实体"):
                for mention in line.replace(f"{entity_type}实体：", "").split("，"):
                    if mention.strip():
                        entities.add((mention.strip(), entity_type))
    return frozenset(entities)


def parse_label(text: str, choices: Sequence[Any]) -> str:
    """The whole stripped text; no check against the label inventory."""
    return text.strip()


def parse_sts_label(text: str, choices: Sequence[Any]) -> str:
    label = text.strip()
    return {"相同": "是的", "不同": "不是"}.get(label, label)


def parse_report(text: str, choices: Sequence[Any]) -> dict[str, str]:
    """Section -> text, from lines after the first that start with `{section}：`; the value is
    what follows the last `{section}：` of the stripped line; a later line overwrites."""
    lines = text.strip().split("\n")[1:]
    report = {}
    for section in MRG_SECTIONS:
        prefix = f"{section}："
        for line in lines:
            if line.startswith(prefix):
                report[section] = line.strip().split(prefix)[-1].strip()
    return report


def _score_report(gold: Sequence[dict], pred: Sequence[dict]) -> float:
    """Rouge-L pooled over one pair per gold section; a section the prediction lacks is ``""``."""
    pairs = [(p.get(section, "").strip(), text.strip())
             for g, p in zip(gold, pred, strict=True) for section, text in g.items()]
    return metrics.mean_rouge_l_chinese(pairs)


def _score_reply(gold: Sequence[str], pred: Sequence[str]) -> float:
    return metrics.mean_rouge_l_chinese(zip(pred, gold, strict=True))


@dataclasses.dataclass(frozen=True)
class Task:
    parse: Callable[[str, Sequence[Any]], Any]  # normalised text, answer_choices -> structure
    metric: Callable[[Sequence[Any], Sequence[Any]], float]  # (gold, pred) structures -> score


TASKS: dict[str, Task] = {
    "CMeEE-V2": Task(parse_entities, metrics.set_micro_f1),
    "CMeIE": Task(parse_cmeie, metrics.set_micro_f1),
    "CHIP-CDN": Task(parse_cdn, metrics.set_micro_f1),
    "CHIP-CDEE": Task(parse_cdee, metrics.set_micro_f1),
    "IMCS-V2-NER": Task(parse_entities, metrics.set_micro_f1),
    "CHIP-MDCFNPC": Task(parse_mdcfnpc, metrics.set_micro_f1),
    "IMCS-V2-SR": Task(parse_imcs_sr, metrics.set_micro_f1),
    "IMCS-V2-DAC": Task(parse_label, metrics.macro_f1),
    "CHIP-CTC": Task(parse_label, metrics.macro_f1),
    "CHIP-STS": Task(parse_sts_label, metrics.weighted_f1),
    "KUAKE-IR": Task(parse_label, metrics.weighted_f1),
    "KUAKE-QIC": Task(parse_label, metrics.macro_f1),
    "KUAKE-QQR": Task(parse_label, metrics.weighted_f1),
    "KUAKE-QTR": Task(parse_label, metrics.weighted_f1),
    "MedDG": Task(parse_label, _score_reply),
    "IMCS-V2-MRG": Task(parse_report, _score_report),
}
TASK_NAMES = tuple(TASKS)
PAPER_TASKS = ("CMeIE", "CHIP-CDN", "CHIP-CDEE", "CHIP-MDCFNPC", "CHIP-CTC", "KUAKE-QIC",
               "IMCS-V2-MRG", "MedDG")  # the 8 tasks of the MOELoRA and CGC-LoRA papers


def canonical_task(name: str) -> str:
    """The task's reporting name; KeyError for a name that is not a PromptCBLUE task."""
    name = TASK_ALIASES.get(name, name)
    if name not in TASKS:
        raise KeyError(name)
    return name


def parse(task: str, text: str, choices: Sequence[Any] | None) -> Any:
    """Normalise then parse one raw target with the task's parser."""
    return TASKS[canonical_task(task)].parse(normalize_punctuation(text), choices or ())


def score_task(task: str, gold_texts: Sequence[str], pred_texts: Sequence[str],
               choices: Sequence[Sequence[Any] | None]) -> float:
    """One task's official score from raw gold and predicted targets and each sample's choices."""
    spec = TASKS[canonical_task(task)]
    gold = [parse(task, text, c) for text, c in zip(gold_texts, choices, strict=True)]
    pred = [parse(task, text, c) for text, c in zip(pred_texts, choices, strict=True)]
    return spec.metric(gold, pred)
