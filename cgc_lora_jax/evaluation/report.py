"""Results tables and charts: one run's scores, and runs side by side (the paper's Table III / IV).

A run's scores are `{task: score in [0, 1], ..., "average": mean over tasks}` (what
`cgc_lora_jax.scoring` returns), stored as RUN/scores_<split>.json. Tables print percentages
with two decimals; rows are runs, columns are the tasks (in the order they first appear) and
"Avg." last, so baselines read side by side:

    | run      | CMeIE | CHIP-CDN | ... | Avg.  |
    |---|---|---|---|---|
    | cgc_lora | 41.13 | 87.20    | ... | 60.21 |

A task a run did not score shows "-". Charts are PNG bar charts drawn with matplotlib's Agg
canvas (no display needed): one bar per task for a run, grouped bars per task for a comparison.

    write_scores("runs/demo", "test", scores, title="demo")     # scores_test.{json,md,png}
    rows = read_runs(["runs/cgc", "runs/lora_full"], "test")
    print(markdown_table(rows)); plot_comparison(rows, "compare_test.png")
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

AVERAGE = "average"  # the key of the mean over tasks in a scores dict


def task_columns(rows: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Every task of every run, in first-seen order, without "average"."""
    tasks: dict[str, None] = {}
    for scores in rows.values():
        tasks.update((t, None) for t in scores if t != AVERAGE)
    return list(tasks)


def markdown_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """A Markdown table: one row per run, one column per task, then "Avg." (percentages)."""
    tasks = task_columns(rows)

    def cell(scores, key):
        return f"{100 * scores[key]:.2f}" if key in scores else "-"

    lines = ["| run | " + " | ".join(tasks) + " | Avg. |", "|---" * (len(tasks) + 2) + "|"]
    for name, scores in rows.items():
        lines.append(f"| {name} | " + " | ".join(cell(scores, t) for t in tasks) + f" | {cell(scores, AVERAGE)} |")
    return "\n".join(lines) + "\n"


def scores_path(run_dir: str | os.PathLike, split: str) -> Path:
    return Path(run_dir) / f"scores_{split}.json"


def read_scores(run_dir: str | os.PathLike, split: str) -> dict[str, float]:
    """A run's scores_<split>.json; the error names the file and the command that writes it."""
    path = scores_path(run_dir, split)
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"{run_dir} is not a folder")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: evaluate the run first "
                                f"(python eval.py --workdir {run_dir} --split {split})")
    try:
        scores = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err.msg})") from None
    if not isinstance(scores, dict) or AVERAGE not in scores:
        raise ValueError(f"{path}: expected {{task: score, ..., \"{AVERAGE}\": mean}}")
    return scores


def run_names(run_dirs: Sequence[str | os.PathLike]) -> list[str]:
    """Row names: each folder's name, or its full path where two runs share a name."""
    names = [Path(d).name or str(d) for d in run_dirs]
    return [str(d) if names.count(n) > 1 else n for d, n in zip(run_dirs, names)]


def read_runs(run_dirs: Sequence[str | os.PathLike], split: str) -> dict[str, dict[str, float]]:
    """{row name: scores} of several evaluated runs, in the given order."""
    if not run_dirs:
        raise ValueError("name at least one evaluated run folder")
    return dict(zip(run_names(run_dirs), (read_scores(d, split) for d in run_dirs)))


def _bar_figure(width: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def plot_scores(scores: Mapping[str, float], path: str | os.PathLike, title: str) -> Path:
    """A PNG with one bar per task (percent) and the average as a dashed line."""
    tasks = [t for t in scores if t != AVERAGE]
    figure, ax = _bar_figure(max(4.0, 1.1 * len(tasks) + 2))
    bars = ax.bar(range(len(tasks)), [100 * scores[t] for t in tasks], color="tab:blue")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    if AVERAGE in scores:
        ax.axhline(100 * scores[AVERAGE], color="tab:red", linestyle="--",
                   label=f"Avg. {100 * scores[AVERAGE]:.2f}")
        ax.legend(loc="upper right")
    _finish(ax, tasks, title)
    figure.savefig(path, dpi=100)
    return Path(path)


def plot_comparison(rows: Mapping[str, Mapping[str, float]], path: str | os.PathLike,
                    title: str = "") -> Path:
    """A PNG with, per task and for "Avg.", one bar per run (missing scores are left out)."""
    columns = task_columns(rows) + [AVERAGE]
    figure, ax = _bar_figure(min(12.0, max(5.0, 0.35 * len(columns) * len(rows) + 3)))
    width = 0.8 / len(rows)
    for i, (name, scores) in enumerate(rows.items()):
        xs = [c + (i - (len(rows) - 1) / 2) * width for c, key in enumerate(columns) if key in scores]
        ax.bar(xs, [100 * scores[key] for key in columns if key in scores], width, label=name)
    ax.legend(fontsize=8, ncols=min(len(rows), 4), loc="upper left")
    _finish(ax, [c if c != AVERAGE else "Avg." for c in columns], title)
    figure.savefig(path, dpi=100)
    return Path(path)


def _finish(ax, labels: Sequence[str], title: str) -> None:
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)


def write_scores(out_dir: str | os.PathLike, split: str, scores: Mapping[str, float], title: str) -> str:
    """OUT/scores_<split>.json, .md (a one-row table) and .png; returns the Markdown table."""
    out_dir = Path(out_dir)
    scores_path(out_dir, split).write_text(json.dumps(scores, indent=2, ensure_ascii=False) + "\n",
                                           encoding="utf-8")
    table = markdown_table({title: scores})
    (out_dir / f"scores_{split}.md").write_text(table, encoding="utf-8")
    plot_scores(scores, out_dir / f"scores_{split}.png", f"{title} ({split})")
    return table


def compare(run_dirs: Sequence[str | os.PathLike], split: str = "test",
            chart: str | os.PathLike | None = None) -> tuple[str, Path]:
    """(Markdown table, chart path) of evaluated runs side by side.

    The chart and the table (as compare_<split>.md) go beside the runs (their common parent
    folder) unless `chart` names the PNG.
    """
    rows = read_runs(run_dirs, split)
    if chart is None:
        chart = Path(os.path.commonpath([Path(d).resolve() for d in run_dirs]))
        chart = (chart if len(run_dirs) > 1 else chart.parent) / f"compare_{split}.png"
    chart = Path(chart)
    chart.parent.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    chart.with_suffix(".md").write_text(table, encoding="utf-8")
    plot_comparison(rows, chart, f"{split} scores")
    return table, chart
