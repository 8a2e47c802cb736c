"""Orbax checkpoints of a training run: adapters, gate, optimizer state, step, data position.

The frozen base is never copied: its path and fingerprint (`run.fingerprint_base`) are recorded,
and resuming against a different base is a BaseMismatchError. Orbax writes each step into a
temporary folder and renames it when complete, so a crash mid-save leaves the previous
checkpoints intact; the last `keep` are kept. What is checked before a step is restored, and what
happens to a damaged one: checkpoint_checks.py. A failed write (a full disk) is
CheckpointWriteError naming the last good step.

    ckpt = RunCheckpoints(workdir, keep=3, base={"path": p, "fingerprint": fingerprint_base(p)})
    restored = ckpt.restore_latest(abstract_state, cfg.to_dict())     # None on a fresh run
    ckpt.save(step, state, meta={"data": iterator_state, "config": cfg_dict})
"""

from __future__ import annotations

import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from cgc_lora_jax.run import BaseMismatchError
from cgc_lora_jax.training.checkpoint_checks import (UNREADABLE_SUFFIX, CheckpointError, CheckpointFallbackWarning,
                                                     CheckpointLayoutError, CheckpointUnreadableError,
                                                     CheckpointWriteError, RunConfigMismatchError, config_drift,
                                                     describe, layout_mismatch, quiet_orbax_tracebacks,
                                                     unfinished_writes)
from cgc_lora_jax.training.distributed import barrier


class RunCheckpoints:
    def __init__(self, workdir: str | Path, keep: int, base: dict):
        self.directory = Path(workdir).resolve() / "checkpoints"
        self.base = base
        quiet_orbax_tracebacks()
        for tmp in unfinished_writes(self.directory):
            warnings.warn(f"{tmp}: an unfinished checkpoint write (the run was stopped while saving); "
                          "it is never restored and is removed", CheckpointFallbackWarning, stacklevel=2)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
        )
        self._saving: int | None = None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _write_failed(self, step: int, error: BaseException) -> CheckpointWriteError:
        good = [s for s in self.manager.all_steps() if s != step]
        return CheckpointWriteError(
            f"writing checkpoint {self.directory / str(step)} failed ({describe(error)}); the run stops. "
            f"The last good checkpoint is {self.directory / str(max(good)) if good else 'none'}; free disk "
            "space (or fix the folder's permissions) and run the same command to resume from it")

    def save(self, step: int, state, meta: dict) -> None:
        """Start writing `step` (orbax writes in the background; a failure of the previous
        write surfaces here or in `wait` as CheckpointWriteError)."""
        meta = {**meta, "step": int(step), "base": self.base}
        self.wait()
        try:
            self._saving = step
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        except Exception as e:  # orbax and TensorStore raise plain Exception / OSError / ValueError
            raise self._write_failed(step, e) from e

    def _check(self, step: int, meta: dict, abstract_state, config: dict | None) -> None:
        path = self.directory / str(step)
        saved = meta.get("base", {})
        if saved.get("fingerprint") != self.base.get("fingerprint"):
            raise BaseMismatchError(
                f"{path} was trained on base {saved.get('path')!r} "
                f"(fingerprint {str(saved.get('fingerprint'))[:12]}), but this run's base is "
                f"{self.base.get('path')!r} (fingerprint {str(self.base.get('fingerprint'))[:12]}); "
                "use the same base model or a new --workdir"
            )
        drift = config_drift(meta.get("config", {}), config) if config is not None else []
        if drift:
            raise RunConfigMismatchError(
                f"{path} was saved with other settings than this run's (the workdir's config.json is "
                "the saved one): " + "; ".join(f"{k} = {old!r} there, {new!r} now" for k, old, new in drift)
                + ". Resume with the saved values, or start a new --workdir")
        saved_arrays = self.manager.item_metadata(step)["state"]
        if not jax.tree.leaves(saved_arrays):  # damage, not another layout: try an older step
            raise FileNotFoundError(f"{path / 'state'} lists no arrays (its _METADATA is missing or empty)")
        problems = layout_mismatch(saved_arrays, abstract_state)
        if problems:
            raise CheckpointLayoutError(
                f"{path} holds another adapter layout than this config builds: " + "; ".join(problems)
                + ". It comes from another CGC-LoRA configuration; use that configuration or a new --workdir")

    def _set_aside(self, steps: list[int]) -> None:
        """Rename unreadable steps (all newer than the restored one, so they would collide with
        the steps to come) out of orbax's sight, keeping their files."""
        if jax.process_index() == 0:
            for step in steps:
                path = self.directory / str(step)
                path.rename(path.with_name(path.name + UNREADABLE_SUFFIX))
        barrier("cgc_lora_jax:set_aside")
        self.manager.reload()

    def restore_latest(self, abstract_state, config: dict | None = None) -> tuple[object, dict] | None:
        """(state, meta) of the newest step that can be restored, or None when there is none;
        `config` (this run's, as a dict) must match the saved one (see checkpoint_checks)."""
        failed = {}
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
                self._check(step, meta, abstract_state, config)
                restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
            except (CheckpointError, BaseMismatchError):  # the run's fault, not the step's: no fall-back
                raise
            except Exception as e:  # a damaged step: orbax/TensorStore raise plain Exception, KeyError, ...
                failed[step] = describe(e)
                continue
            for bad, why in failed.items():
                warnings.warn(f"{self.directory / str(bad)} cannot be read ({why}); it is moved to "
                              f"{bad}{UNREADABLE_SUFFIX} and the run resumes from step {step}",
                              CheckpointFallbackWarning, stacklevel=2)
            if failed:
                self._set_aside(list(failed))
            return restored.state, meta
        if failed:
            raise CheckpointUnreadableError(
                f"no checkpoint in {self.directory} can be read: "
                + "; ".join(f"step {s}: {why}" for s, why in failed.items())
                + ". Move the folder aside to start over, or restore it from a backup")
        return None

    def wait(self) -> None:
        """Block until the last write is complete; CheckpointWriteError if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            step, self._saving = self._saving, None
            raise self._write_failed(step if step is not None else -1, e) from e
        self._saving = None

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree):
    """Shape/dtype/sharding stand-ins for restoring into the same layout as `tree`."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
