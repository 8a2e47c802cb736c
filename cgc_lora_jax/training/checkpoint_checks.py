"""What makes a saved step safe to resume from, checked before orbax reads a single array.

A resume restores the newest step that passes, in this order:

  1. unfinished writes: orbax writes step N into `N.orbax-checkpoint-tmp-<time>` and renames it
     when complete, so such a folder is a write that was killed; it is never restored (a warning
     names it, and orbax removes it);
  2. the run's settings: the config saved with the step must equal this run's, except the keys
     in RESUMABLE (how long to train and how often to log, evaluate or save) and the paths of
     the base and data (their identity is checked separately: the base by fingerprint, the data
     by the iterator's sample count). A difference is RunConfigMismatchError naming each key;
  3. the state's layout: every array's path and shape in the checkpoint must be the ones this
     config builds (`layout_mismatch`); another CGC-LoRA layout or an adapter shape that no
     longer matches is CheckpointLayoutError naming the paths;
  4. reading: a step whose files cannot be read (truncated, missing an item) is skipped with a
     warning and moved aside to `N.unreadable` (kept, never deleted); the previous step is tried.
     When no step can be read, CheckpointUnreadableError names each step and its error.

2 and 3 are errors, not fall-backs: an older step has the same settings and layout, and
starting over silently would throw away the run.

    drift = config_drift(saved_meta["config"], cfg.to_dict())   # [(key, saved, now), ...]
    problems = layout_mismatch(manager.item_metadata(step)["state"], abstract_state)
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax

TMP_MARK = ".orbax-checkpoint-tmp"
UNREADABLE_SUFFIX = ".unreadable"
# Keys a resumed run may change: they decide how long to go on and what to log, not the math
# of the steps already taken.
RESUMABLE = ("train.steps", "train.log_every", "train.eval_every", "train.eval_batches", "train.checkpoint_every",
             "train.keep_checkpoints", "model.path", "data.path", "model.remat", "data.max_eval_per_task")
RESUMABLE_PREFIXES = ("eval.",)


class CheckpointError(RuntimeError):
    """A run's checkpoints cannot be used or written; the message names the path and the fix."""


class RunConfigMismatchError(CheckpointError):
    pass


class CheckpointLayoutError(CheckpointError):
    pass


class CheckpointUnreadableError(CheckpointError):
    pass


class CheckpointWriteError(CheckpointError):
    pass


class CheckpointFallbackWarning(UserWarning):
    """A step was skipped (unfinished or unreadable) and an older one is used."""


def unfinished_writes(directory: Path) -> list[Path]:
    return sorted(p for p in Path(directory).glob(f"*{TMP_MARK}*") if p.is_dir()) if Path(directory).is_dir() else []


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _comparable(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def config_drift(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, current value) for every setting that differs and may not change on
    resume; a key present on one side only counts as a difference."""
    saved, current = _flatten(saved), _flatten(current)
    missing = object()
    drift = []
    for key in sorted(set(saved) | set(current)):
        if key in RESUMABLE or key.startswith(RESUMABLE_PREFIXES):
            continue
        old, new = saved.get(key, missing), current.get(key, missing)
        if _comparable(old) != _comparable(new):
            drift.append((key, "(absent)" if old is missing else old, "(absent)" if new is missing else new))
    return drift


def _key_name(key) -> str:
    for attribute in ("key", "idx", "name"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def array_shapes(tree) -> dict[str, tuple]:
    """{"adapters/transformer/layers_0/.../lora/A": shape, ...} of a state, abstract state or
    orbax metadata tree (their key types differ; the names do not)."""
    return {"/".join(_key_name(k) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def layout_mismatch(saved_metadata, abstract_state, limit: int = 6) -> list[str]:
    """What differs between the checkpoint's arrays and those this run builds (empty: none)."""
    saved, wanted = array_shapes(saved_metadata), array_shapes(abstract_state)
    problems = [f"{p}: shape {saved[p]} in the checkpoint, {wanted[p]} in this config"
                for p in sorted(saved.keys() & wanted.keys()) if saved[p] != wanted[p]]
    problems += [f"{p}: only in the checkpoint" for p in sorted(saved.keys() - wanted.keys())]
    problems += [f"{p}: only in this config" for p in sorted(wanted.keys() - saved.keys())]
    return problems[:limit] + ([f"... and {len(problems) - limit} more"] if len(problems) > limit else [])


def describe(error: BaseException) -> str:
    """One line for an error from orbax or TensorStore (whose messages run to pages of specs)."""
    parts = []
    while error is not None and len(parts) < 2:
        line = (str(error).strip().splitlines() or [""])[0]
        for noise in (" See full TensorStore details", " [tensorstore_spec", " [source locations"):
            line = line.split(noise)[0]
        if len(line) > 300:  # TensorStore puts the what first and the why (the OS error) last
            line = f"{line[:160]} ... {line[-130:]}"
        parts.append(f"{type(error).__name__}: {line}")
        error = error.__cause__
    return "; caused by ".join(parts)


class _OneLineOrbaxErrors(logging.Filter):
    """Orbax logs a failed background write with its full traceback before the error reaches
    the run (as CheckpointWriteError); keep its one-line message only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" in record.pathname and record.exc_info:
            record.exc_info, record.exc_text = None, None
        return True


def quiet_orbax_tracebacks() -> None:
    logger = logging.getLogger("absl")  # orbax logs through absl
    if not any(isinstance(f, _OneLineOrbaxErrors) for f in logger.filters):
        logger.addFilter(_OneLineOrbaxErrors())
