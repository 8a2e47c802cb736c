"""The demo's English reading tasks: three generated tasks over one short sentence each.

Each task needs what a pretrained model knows about English (which word is a city, what a
review feels like, which adjective is the opposite of another); an instruct base such as
SmolLM2-135M-Instruct understands the questions but answers in a sentence ("The city mentioned
is Madrid."), so untuned it scores low under the exact one-word answer this dataset asks for,
and a brief adapter training teaches the format:

    CityExtraction   extraction  "Which city? Tom drove to Madrid on Monday."      -> "Madrid"
    ReviewSentiment  cls         "Positive or negative? The soup was cold."         -> "negative"
    Antonym          generation  "Opposite of the adjective? The tea is very hot."  -> "cold"

Records carry PromptCBLUE's fields (input, target, answer_choices, task_type, task_dataset,
sample_id) and are written as DIR/train.json, dev.json, test.json; test.json keeps its targets so
the demo can be scored. Generation is deterministic from the seed: task k draws from
`numpy.random.default_rng([seed, k])`, a sentence never repeats within a task (so dev and test
sentences are unseen in training; the word pools are shared), and each split is shuffled across
tasks.

Score of every task: exact-match accuracy in [0, 1] of the normalised answer (`normalise`:
lower case, surrounding blanks, quotes and final punctuation removed), so "Madrid." and
"madrid" match "Madrid" while "The city is Madrid." does not.

    write_dataset("workdir/data", seed=0)
    score_task("Antonym", ["cold", "big"], ["Cold.", "The opposite is small"])   # 0.5
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cgc_lora_jax.demo.splits import generate_splits, known_task, write_splits

NAMES = ("Tom", "Maria", "Anna", "James", "Lucy", "Omar", "Chen", "Sofia", "David", "Emma", "Yuki",
         "Peter", "Laura", "Ahmed", "Nina", "Carlos")
CITIES = ("Paris", "London", "Madrid", "Rome", "Berlin", "Tokyo", "Lisbon", "Vienna", "Moscow",
          "Cairo", "Sydney", "Toronto", "Chicago", "Boston", "Dublin", "Prague", "Athens", "Beijing",
          "Seoul", "Mumbai", "Istanbul", "Amsterdam", "Barcelona", "Venice", "Oslo", "Stockholm",
          "Warsaw", "Budapest", "Mexico City", "New York", "Los Angeles", "San Francisco")
CITY_PHRASES = ("flew to {}", "moved to {}", "was born in {}", "works in {}", "visited {}",
                "drove to {}", "studied in {}", "met a friend in {}", "took a train to {}",
                "lives in {}")
TIMES = ("last year", "in May", "on Monday", "yesterday", "with her family", "for work",
         "last summer", "in 2019", "")
THINGS = ("food", "hotel", "movie", "service", "concert", "book", "room", "staff", "trip", "game",
          "coffee", "show", "phone", "pizza", "museum")
POSITIVE = ("wonderful", "delicious", "amazing", "lovely", "excellent", "great", "friendly",
            "beautiful", "perfect", "fantastic", "pleasant", "superb")
NEGATIVE = ("terrible", "awful", "boring", "rude", "dirty", "horrible", "disappointing", "bad",
            "noisy", "slow", "broken", "overpriced")
REVIEW_FORMS = ("The {thing} was {adj}.", "What a {adj} {thing}!", "Our {thing} was really {adj}.",
                "I found the {thing} {adj}.", "Honestly, the {thing} was {adj}.")
LABELS = ("positive", "negative")
# Each adjective has one opposite here; words with two common opposites (short, light, old,
# hard) only ever appear as answers, never as the adjective asked about.
ANTONYMS = {
    "hot": "cold", "cold": "hot", "big": "small", "small": "big", "fast": "slow", "slow": "fast",
    "happy": "sad", "sad": "happy", "rich": "poor", "poor": "rich", "strong": "weak",
    "weak": "strong", "early": "late", "late": "early", "loud": "quiet", "quiet": "loud",
    "clean": "dirty", "dirty": "clean", "full": "empty", "empty": "full", "wet": "dry",
    "dry": "wet", "thick": "thin", "thin": "thick", "open": "closed", "closed": "open",
    "cheap": "expensive", "expensive": "cheap", "wide": "narrow", "narrow": "wide",
    "safe": "dangerous", "dangerous": "safe", "young": "old", "heavy": "light", "tall": "short",
    "long": "short", "soft": "hard", "deep": "shallow", "shallow": "deep",
}
SUBJECTS = ("the tea", "the room", "the road", "the box", "the river", "my bag", "the door",
            "his coat", "the street", "her dog", "the bottle", "the car", "the rope", "our house")
ANTONYM_FORMS = ("{subject} is {adj}.", "{subject} was very {adj}.", "I think {subject} is {adj}.",
                 "{subject} looked {adj} today.")

TASK_NAMES = ("CityExtraction", "ReviewSentiment", "Antonym")
TASK_TYPES = {"CityExtraction": "extraction", "ReviewSentiment": "cls", "Antonym": "generation"}
PROMPTS = {"CityExtraction": "Which city? {}", "ReviewSentiment": "Positive or negative? {}",
           "Antonym": "Opposite of the adjective? {}"}
SPLIT_SIZES = {"train": 320, "dev": 24, "test": 24}  # default samples per task and split
_EDGES = re.compile(r"""^[\s"'`“”‘’]+|[\s"'`“”‘’.!?,;:]+$""")


def _pick(rng: np.random.Generator, pool: Sequence[str]) -> str:
    return pool[int(rng.integers(len(pool)))]


def _sentence_case(text: str) -> str:
    return text[0].upper() + text[1:]


def _city_example(rng: np.random.Generator) -> tuple[str, str, list[str]]:
    city = _pick(rng, CITIES)
    time = _pick(rng, TIMES)
    sentence = f"{_pick(rng, NAMES)} {_pick(rng, CITY_PHRASES).format(city)}" + (f" {time}" if time else "") + "."
    return sentence, city, []


def _review_example(rng: np.random.Generator) -> tuple[str, str, list[str]]:
    label = _pick(rng, LABELS)
    adjective = _pick(rng, POSITIVE if label == "positive" else NEGATIVE)
    sentence = _pick(rng, REVIEW_FORMS).format(thing=_pick(rng, THINGS), adj=adjective)
    return sentence, label, list(LABELS)


def _antonym_example(rng: np.random.Generator) -> tuple[str, str, list[str]]:
    adjective = _pick(rng, tuple(ANTONYMS))
    sentence = _sentence_case(_pick(rng, ANTONYM_FORMS).format(subject=_pick(rng, SUBJECTS), adj=adjective))
    return sentence, ANTONYMS[adjective], []


_GENERATORS = {"CityExtraction": _city_example, "ReviewSentiment": _review_example,
               "Antonym": _antonym_example}


def _record(task: str, rng: np.random.Generator) -> dict:
    sentence, target, choices = _GENERATORS[task](rng)
    return {"input": PROMPTS[task].format(sentence), "target": target, "answer_choices": choices,
            "task_type": TASK_TYPES[task], "task_dataset": task}


def records(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """{split: records} with sizes[split] records of every task, shuffled across tasks."""
    return generate_splits(TASK_NAMES, _record, SPLIT_SIZES if sizes is None else sizes, seed)


def write_dataset(out_dir: str | os.PathLike, *, seed: int = 0,
                  sizes: dict[str, int] | None = None) -> dict[str, Path]:
    """Write OUT_DIR/<split>.json for every split; returns {split: path}."""
    return write_splits(records(seed, sizes), out_dir)


def normalise(answer: str) -> str:
    """Lower case, without surrounding blanks and quotes or final punctuation."""
    return _EDGES.sub("", answer.strip()).lower()


def canonical_task(name: str) -> str:
    """The task name itself; KeyError for a name that is not one of these tasks."""
    return known_task(name, TASK_NAMES)


def score_task(task: str, gold_texts: Sequence[str], pred_texts: Sequence[str],
               choices: Sequence | None = None) -> float:
    """Exact-match accuracy of the normalised answers (`choices` is unused)."""
    canonical_task(task)
    if len(gold_texts) != len(pred_texts):
        raise ValueError(f"{len(gold_texts)} gold targets but {len(pred_texts)} predictions")
    if not gold_texts:
        return 0.0
    return sum(normalise(g) == normalise(p) for g, p in zip(gold_texts, pred_texts)) / len(gold_texts)
