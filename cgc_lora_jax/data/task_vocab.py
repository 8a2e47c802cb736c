"""Task vocabulary: the fixed map from task names to the integer task IDs the CGC-LoRA gate reads.

A run's task IDs must be the same in training, evaluation and export, so the vocabulary is saved
as JSON beside the run and loaded back instead of being rebuilt from whatever data is at hand:

    {"tasks": ["CMeIE", "CHIP-CDN", ...]}          task_id = position in the list

Order: a configured task subset keeps its configured order (`TaskVocab(scoring.promptcblue.PAPER_TASKS)`
gives CMeIE id 0, CHIP-CDN id 1, ...); without one, `TaskVocab.from_data` sorts the task names
found in the training data (code-point order), so the same files always give the same IDs.

Usage::

    vocab = TaskVocab(promptcblue.PAPER_TASKS)    # from cgc_lora_jax.scoring import promptcblue
    vocab.save(run_dir / "task_vocab.json")                   # what a training run writes
    TaskVocab.load(run_dir / "task_vocab.json").id("CHIP-CDN")      # 1
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

_FILE_KEY = "tasks"


class TaskVocab:
    """An ordered, duplicate-free list of task names; a task's ID is its position."""

    def __init__(self, tasks: Sequence[str]):
        tasks = tuple(tasks)
        if not tasks:
            raise ValueError("a task vocabulary needs at least one task")
        bad = [task for task in tasks if not isinstance(task, str) or not task]
        if bad:
            raise ValueError(f"task names must be non-empty strings, got {bad!r}")
        duplicates = sorted(task for task, count in Counter(tasks).items() if count > 1)
        if duplicates:
            raise ValueError(f"task names appear twice in the vocabulary: {duplicates}")
        self.tasks = tasks
        self._ids = {task: i for i, task in enumerate(tasks)}

    @classmethod
    def from_data(cls, task_names: Iterable[str]) -> TaskVocab:
        """The sorted distinct task names seen in the data (used when no subset is configured)."""
        return cls(sorted(set(task_names)))

    def id(self, task: str) -> int:
        """The task's ID; KeyError naming the known tasks for a task outside the vocabulary."""
        try:
            return self._ids[task]
        except KeyError:
            raise KeyError(f"task {task!r} is not in the task vocabulary {list(self.tasks)}") from None

    def name(self, task_id: int) -> str:
        return self.tasks[task_id]

    def __contains__(self, task: object) -> bool:
        return task in self._ids

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self):
        return iter(self.tasks)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskVocab) and self.tasks == other.tasks

    def __hash__(self) -> int:
        return hash(self.tasks)

    def __repr__(self) -> str:
        return f"TaskVocab({list(self.tasks)!r})"

    def as_dict(self) -> dict[str, int]:
        """{task name: task ID}, for logging."""
        return dict(self._ids)

    def save(self, path: str | os.PathLike) -> None:
        """Write `{"tasks": [...]}` (UTF-8 JSON, names unescaped) to `path`, creating its folder."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({_FILE_KEY: list(self.tasks)}, ensure_ascii=False, indent=2)
        path.write_text(text + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> TaskVocab:
        """Read a vocabulary written by `save`; errors name the file."""
        path = Path(path)
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"task vocabulary {path} does not exist; training writes it "
                                    "beside the run") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not a JSON task vocabulary ({err.msg})") from None
        if not isinstance(content, dict) or not isinstance(content.get(_FILE_KEY), list):
            raise ValueError(f'{path}: expected {{"{_FILE_KEY}": [task names, ...]}}')
        try:
            return cls(content[_FILE_KEY])
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
