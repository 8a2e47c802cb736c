"""Orbax checkpoints of a training run: adapters, gate, optimizer state, step, data position.

The frozen base is never copied: its path and a fingerprint (config.json and, per weight file,
name, size and a hash of its first and last MiB) are recorded, and resuming against a different
base is an error. Orbax writes each step into a temporary folder and renames it when complete,
so a crash mid-save leaves the previous checkpoints intact; the last `keep` are kept.

    ckpt = RunCheckpoints(workdir, keep=3, base={"path": p, "fingerprint": fingerprint_base(p)})
    restored = ckpt.restore_latest(abstract_state)     # None on a fresh run
    ckpt.save(step, state, meta={"data": iterator_state, "config": cfg_dict})
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp

MIB = 1 << 20


def fingerprint_base(path: str | Path) -> str:
    """A cheap identity of a Hugging Face folder (no full read of a 12 GB checkpoint)."""
    folder = Path(path)
    digest = hashlib.sha256()
    for file in sorted(folder.iterdir()) if folder.is_dir() else [folder]:  # or one .gguf file
        if file.name == "config.json" or file.suffix in (".json", ".model"):
            digest.update(file.name.encode() + file.read_bytes())
        elif file.suffix in (".bin", ".safetensors", ".gguf"):
            size = file.stat().st_size
            digest.update(f"{file.name}:{size}".encode())
            with open(file, "rb") as f:
                digest.update(f.read(MIB))
                f.seek(max(size - MIB, 0))
                digest.update(f.read(MIB))
    return digest.hexdigest()


class BaseMismatchError(RuntimeError):
    pass


class RunCheckpoints:
    def __init__(self, workdir: str | Path, keep: int, base: dict):
        self.directory = Path(workdir).resolve() / "checkpoints"
        self.base = base
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        meta = {**meta, "step": int(step), "base": self.base}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    def restore_latest(self, abstract_state) -> tuple[object, dict] | None:
        """(state, meta) of the newest complete checkpoint, or None when there is none."""
        step = self.manager.latest_step()
        if step is None:
            return None
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        saved = meta.get("base", {})
        if saved.get("fingerprint") != self.base.get("fingerprint"):
            raise BaseMismatchError(
                f"{self.directory / str(step)} was trained on base {saved.get('path')!r} "
                f"(fingerprint {str(saved.get('fingerprint'))[:12]}), but this run's base is "
                f"{self.base.get('path')!r} (fingerprint {str(self.base.get('fingerprint'))[:12]}); "
                "use the same base model or a new --workdir"
            )
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        return restored.state, meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def save_adapters(directory: str | Path, adapters, meta: dict) -> Path:
    """The trained adapters and gate as a standalone orbax checkpoint, plus meta as JSON."""
    directory = Path(directory).resolve()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / "params", adapters, force=True)
    tmp = directory / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    tmp.replace(directory / "meta.json")
    return directory


def load_adapters(directory: str | Path, abstract_adapters=None) -> tuple[object, dict]:
    directory = Path(directory).resolve()
    if not (directory / "meta.json").is_file():
        raise FileNotFoundError(f"{directory}: no meta.json; not an adapters folder written by save_adapters")
    meta = json.loads((directory / "meta.json").read_text())
    with ocp.StandardCheckpointer() as checkpointer:
        adapters = checkpointer.restore(directory / "params", abstract_adapters)
    return adapters, meta


def abstract_like(tree):
    """Shape/dtype/sharding stand-ins for restoring into the same layout as `tree`."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
