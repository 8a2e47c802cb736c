"""Writing a Hugging Face folder: safetensors files (sharded above a size, with an index) and
config.json, streamed tensor by tensor and swapped into place atomically.

    tensors = [TensorSpec("lm_head.weight", (V, d), np.dtype("float32"), lambda: head_vd)]
    write_folder(Path("out"), tensors, config_dict, parse_size("5GB"))
    # out/model.safetensors (or model-0000i-of-0000n.safetensors + model.safetensors.index.json),
    # out/config.json; files of an existing `out` that are not weights or config.json are kept

A tensor's bytes are produced only when its turn comes, so at most one tensor beyond the
parameters is in memory while writing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import struct
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cgc_lora_jax.models.weight_reader import SAFETENSORS, SAFETENSORS_INDEX, ST_NAMES, WEIGHT_FILE

@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its name, shape and dtype now, its data from produce() when written."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def write_safetensors(file: Path, tensors: list[TensorSpec]) -> None:
    """Header first (shapes are known), then each tensor's bytes as it is produced."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}  # transformers requires "format"
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": ST_NAMES[np.dtype(t.dtype)], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}  # fmt: skip
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors:
            array = np.ascontiguousarray(t.produce())
            if array.shape != tuple(t.shape) or array.dtype != np.dtype(t.dtype):
                raise ValueError(f"{t.name}: made {array.dtype}{array.shape}, declared {t.dtype}{t.shape}")
            f.write(array.reshape(-1).view(np.uint8).data)
            del array
        f.flush()
        os.fsync(f.fileno())


def main_dtype_name(tensors: list[TensorSpec]) -> str:
    """The dtype holding most bytes, as config.json's torch_dtype names it ("bfloat16", ...)."""
    size: dict[str, int] = defaultdict(int)
    for t in tensors:
        size[np.dtype(t.dtype).name] += t.nbytes
    return max(size, key=size.get)


def parse_size(size: int | str) -> int:
    """Bytes from 5_000_000, "5MB" (10^6) or "5MiB" (2^20)."""
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(size).upper())
    if match is None:
        raise ValueError(f"max_shard_size={size!r}: expected bytes or e.g. '2GB', '500MB', '1GiB'")
    count = int(float(match[1]) * units[match[2] or "B"])
    if count <= 0:
        raise ValueError(f"max_shard_size={size!r} must be positive")
    return count


def write_folder(target: Path, tensors: list[TensorSpec], config: dict, max_shard_bytes: int) -> Path:
    """Write the weights (sharded above max_shard_bytes) and config.json to a temporary folder
    beside `target`, then rename it into place."""
    shards: list[list[TensorSpec]] = [[]]
    for t in tensors:
        if shards[-1] and sum(s.nbytes for s in shards[-1]) + t.nbytes > max_shard_bytes:
            shards.append([])
        shards[-1].append(t)
    target = target.absolute()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        if len(shards) == 1:
            write_safetensors(tmp / SAFETENSORS, shards[0])
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(tmp / name, shard)
                weight_map.update({t.name: name for t in shard})
            index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename tmp to target; an existing target's other files (tokenizer, ...) are carried over."""
    if not target.exists():
        os.rename(tmp, target)
        return
    for entry in target.iterdir():
        if entry.name == "config.json" or WEIGHT_FILE.fullmatch(entry.name) or (tmp / entry.name).exists():
            continue
        (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, tmp / entry.name)
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old)
