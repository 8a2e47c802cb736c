"""The built-in demo dataset: three small generated tasks in PromptCBLUE format.

The demo shows multi-task CGC-LoRA training end to end on a CPU, so each task is learnable by a
tiny transformer in minutes (short Chinese inputs over a ~100-character alphabet) and each
needs a different answer format:

    ColourExtraction        extraction  "找出句子里的颜色：小明买了红色的帽子和蓝色的气球\\n答："
                                        -> "颜色：红色，蓝色"   ("颜色：无" when there is none)
    CategoryClassification  cls         "...熊猫\\n这句话里的东西属于哪一类？\\n选项：水果，动物，交通工具\\n答："
                                        -> "动物"   (answer_choices = the three labels)
    DigitsToChinese         generation  "把数字写成汉字：3051\\n答：" -> "三零五一"

Records carry PromptCBLUE's fields (input, target, answer_choices, task_type, task_dataset,
sample_id) and are written as DIR/train.json, dev.json, test.json; unlike PromptCBLUE, test.json
keeps its targets so the demo can be scored. Generation is deterministic from the seed: task k
draws from `numpy.random.default_rng([seed, k])`, an input never repeats within a task (so dev
and test inputs are unseen in training), and each split is shuffled across tasks.

The scorer of these tasks is `cgc_lora_jax.demo.scorer`.

Usage::

    write_demo_dataset("workdir/data", seed=0)       # or data.format="demo" in a config (run.GENERATED_DATASETS)

The demo's tokenizer is `cgc_lora_jax.demo.tokenizer.DemoTokenizer`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cgc_lora_jax.demo.scorer import NO_COLOUR, TASK_NAMES
from cgc_lora_jax.demo.splits import generate_splits, write_splits

NAMES = ("小明", "小红", "小刚", "妈妈", "爸爸", "老师", "弟弟", "姐姐")
COLOURS = ("红色", "蓝色", "绿色", "黄色", "白色", "黑色", "紫色")
THINGS = ("衣服", "帽子", "鞋子", "书包", "杯子", "雨伞", "气球", "围巾")
COLOUR_VERBS = ("买了", "拿着", "看见了", "喜欢")
CATEGORIES = {
    "水果": ("苹果", "香蕉", "西瓜", "葡萄", "橘子", "桃子"),
    "动物": ("小猫", "小狗", "兔子", "老虎", "熊猫", "猴子"),
    "交通工具": ("汽车", "火车", "飞机", "轮船", "自行车", "地铁"),
}
CATEGORY_VERBS = ("看见了", "画了", "想要", "喜欢", "说起了")
TIMES = ("今天", "昨天", "早上", "")
CHINESE_DIGITS = "零一二三四五六七八九"

TASK_TYPES = {"ColourExtraction": "extraction", "CategoryClassification": "cls",
              "DigitsToChinese": "generation"}
SPLIT_SIZES = {"train": 256, "dev": 32, "test": 32}  # default samples per task and split
COLOUR_PROMPT = "找出句子里的颜色：{}\n答："
CATEGORY_PROMPT = "{}\n这句话里的东西属于哪一类？\n选项：{}\n答："
DIGITS_PROMPT = "把数字写成汉字：{}\n答："


def _colour_example(rng: np.random.Generator) -> tuple[str, str, list[str]]:
    """1-3 things, each coloured with probability 0.7; the target lists the distinct colours."""
    things = rng.choice(len(THINGS), size=int(rng.integers(1, 4)), replace=False)
    phrases, colours = [], []
    for thing in things:
        if rng.random() < 0.7:
            colour = COLOURS[int(rng.integers(len(COLOURS)))]
            phrases.append(f"{colour}的{THINGS[thing]}")
            colours.append(colour)
        else:
            phrases.append(THINGS[thing])
    sentence = (NAMES[int(rng.integers(len(NAMES)))]
                + COLOUR_VERBS[int(rng.integers(len(COLOUR_VERBS)))] + "和".join(phrases))
    answer = "，".join(dict.fromkeys(colours)) or NO_COLOUR
    return COLOUR_PROMPT.format(sentence), f"颜色：{answer}", ["颜色"]


def _category_example(rng: np.random.Generator) -> tuple[str, str, list[str]]:
    labels = list(CATEGORIES)
    label = labels[int(rng.integers(len(labels)))]
    items = CATEGORIES[label]
    sentence = (TIMES[int(rng.integers(len(TIMES)))] + NAMES[int(rng.integers(len(NAMES)))]
                + CATEGORY_VERBS[int(rng.integers(len(CATEGORY_VERBS)))]
                + items[int(rng.integers(len(items)))])
    return CATEGORY_PROMPT.format(sentence, "，".join(labels)), label, labels


def _digits_example(rng: np.random.Generator) -> tuple[str, str, list[str]]:
    digits = "".join(str(d) for d in rng.integers(0, 10, size=int(rng.integers(2, 7))))
    return DIGITS_PROMPT.format(digits), "".join(CHINESE_DIGITS[int(d)] for d in digits), []


_GENERATORS = {"ColourExtraction": _colour_example, "CategoryClassification": _category_example,
               "DigitsToChinese": _digits_example}


def _record(task: str, rng: np.random.Generator) -> dict:
    prompt, target, choices = _GENERATORS[task](rng)
    return {"input": prompt, "target": target, "answer_choices": choices, "task_type": TASK_TYPES[task],
            "task_dataset": task}


def demo_records(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """{split: records} with sizes[split] records of every task, shuffled across tasks."""
    return generate_splits(TASK_NAMES, _record, SPLIT_SIZES if sizes is None else sizes, seed)


def write_demo_dataset(out_dir: str | os.PathLike, *, seed: int = 0,
                       sizes: dict[str, int] | None = None) -> dict[str, Path]:
    """Write OUT_DIR/<split>.json for every split; returns {split: path}."""
    return write_splits(demo_records(seed, sizes), out_dir)


def demo_alphabet() -> str:
    """Every character the demo's prompts and targets can contain (the tokenizer's vocabulary)."""
    texts = [*NAMES, *COLOURS, *THINGS, *COLOUR_VERBS, *CATEGORY_VERBS, *TIMES, *CATEGORIES,
             *(item for items in CATEGORIES.values() for item in items), CHINESE_DIGITS,
             "0123456789", COLOUR_PROMPT, CATEGORY_PROMPT, DIGITS_PROMPT, "颜色：，和的", NO_COLOUR]
    return "".join(sorted(set("".join(texts)) - set("{}")))
