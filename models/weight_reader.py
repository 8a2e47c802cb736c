"""Weights files of a Hugging Face folder (or a GGUF file): which file holds each tensor, and
reading one tensor at a time.

    model.safetensors.index.json / pytorch_model.bin.index.json   {"weight_map": {name: shard}}
    model.safetensors    8-byte header length, JSON header {name: {dtype, shape, data_offsets}},
                         then the raw little-endian data
    pytorch_model.bin    a torch state dict (read with torch.load(mmap=True); needs torch)

Each tensor is read into its own fresh, 64-byte aligned buffer (XLA:CPU adopts such a buffer
without a copy), so a checkpoint never sits twice in memory and no parameter aliases the file.

    where = locate_tensors(Path("ckpt"))   # {"lm_head.weight": Path("ckpt/model-00002-of-00002.safetensors"), ...}
    with open_weights(where["lm_head.weight"]) as reader:
        array = reader.read("lm_head.weight")   # numpy, the stored dtype and shape
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open

from cgc_lora_jax.models.gguf import GGUFTensorReader, find_gguf, read_gguf

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
WEIGHT_NAMES = (SAFETENSORS_INDEX, SAFETENSORS, BIN_INDEX, BIN)  # looked for in this order
# A weights file or index by name: what a folder's weights are (saving replaces these, keeps the rest).
WEIGHT_FILE = re.compile(r"(model.*\.safetensors|pytorch_model.*\.bin)(\.index\.json)?")
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip
ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}  # numpy dtype -> safetensors name


def locate_tensors(folder: Path) -> dict[str, Path]:
    """{HF tensor name: the weights file holding it}, from the index or the single file."""
    if (gguf_file := find_gguf(folder)) is not None:
        return {key: gguf_file for key in read_gguf(gguf_file).tensors}
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    for name in WEIGHT_NAMES:
        file = folder / name
        if not file.is_file():
            continue
        if name.endswith(".index.json"):
            try:
                weight_map = json.loads(file.read_text())["weight_map"]
                shards = {str(key): folder / str(shard) for key, shard in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{file} is not a valid index (needs a 'weight_map' object): {e!r}") from e
            for key, shard in shards.items():
                if not shard.is_file():
                    raise FileNotFoundError(
                        f"{file} names shard {shard.name!r} (for key {key!r}), which is not in {folder}"
                    )
            return shards
        with open_weights(file) as reader:
            return {key: file for key in reader.keys()}
    raise FileNotFoundError(f"no weights in {folder}: looked for {', '.join(WEIGHT_NAMES)}")


@contextlib.contextmanager
def open_weights(file: Path):
    """A reader with keys(), ordered(keys) (file order) and read(key) -> numpy array."""
    if file.suffix == ".gguf":
        reader = GGUFTensorReader(file)
    else:
        reader = _SafetensorsReader(file) if file.name.endswith(".safetensors") else _TorchReader(file)
    try:
        yield reader
    finally:
        reader.close()


def _aligned_bytes(nbytes: int, alignment: int = 64) -> np.ndarray:
    """An uninitialised uint8 buffer whose start is `alignment`-aligned (XLA CPU's requirement
    for adopting host memory without a copy)."""
    raw = np.empty(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start : start + nbytes]


class _SafetensorsReader:
    """Parses the header, then reads each tensor into its own buffer (no mmap of the file)."""

    def __init__(self, file: Path):
        self.file, size = file, file.stat().st_size
        self.handle = open(file, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        try:
            (header_len,) = struct.unpack("<Q", self.handle.read(8))
            if header_len > size - 8:
                raise ValueError(f"header of {header_len} bytes, but the file has {size} bytes")
            header = json.loads(self.handle.read(header_len))
            header.pop("__metadata__", None)
            self.entries = {}
            for key, info in header.items():
                dtype, shape = np.dtype(_ST_DTYPES[info["dtype"]]), tuple(info["shape"])
                begin, end = info["data_offsets"]
                if end - begin != math.prod(shape) * dtype.itemsize or 8 + header_len + end > size:
                    raise ValueError(f"tensor {key!r} needs data bytes {begin}..{end}, beyond the file's end")
                self.entries[key] = (dtype, shape, 8 + header_len + begin)
            with safe_open(str(file), framework="numpy"):  # the library's own checks
                pass
        except Exception as e:  # noqa: BLE001 - every parse failure means the same to the user
            self.handle.close()
            raise ValueError(f"{file} is not a valid safetensors file (truncated or corrupt): {e}") from e

    def keys(self) -> list[str]:
        return list(self.entries)

    def ordered(self, keys) -> list[str]:
        return sorted(keys, key=lambda k: self.entries.get(k, (None, None, -1))[2])

    def read(self, key: str) -> np.ndarray:
        if key not in self.entries:
            raise ValueError(f"key {key!r} is not in {self.file}, though the index names that file for it")
        dtype, shape, start = self.entries[key]
        buffer = _aligned_bytes(math.prod(shape) * dtype.itemsize)
        view, done = memoryview(buffer), 0
        self.handle.seek(start)
        while done < buffer.size:  # raw reads may return less (Linux caps one read near 2 GiB)
            got = self.handle.readinto(view[done:])
            if not got:
                raise ValueError(f"{self.file} is truncated: key {key!r} ends past the end of the file")
            done += got
        return buffer.view(dtype).reshape(shape)

    def close(self):
        self.handle.close()


def _import_torch(file: Path):
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading {file} needs torch (pip install 'cgc-lora-jax[test]', or torch); "
            "safetensors checkpoints (model.safetensors) do not"
        ) from e
    return torch


class _TorchReader:
    """torch.load(mmap=True): tensors stay in the file until read; close() drops the mapping."""

    def __init__(self, file: Path):
        self.file, self.torch = file, _import_torch(file)
        try:
            try:
                self.state = self.torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # the legacy (pre zip) format cannot be mapped
                    raise
                self.state = self.torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot read {file} with torch.load (truncated or corrupt?): {e}") from e
        if not isinstance(self.state, dict):
            raise ValueError(f"{file} holds a {type(self.state).__name__}, not a state dict of tensors")

    def keys(self) -> list[str]:
        return list(self.state)

    def ordered(self, keys) -> list[str]:
        order = {k: i for i, k in enumerate(self.state)}
        return sorted(keys, key=lambda k: order.get(k, -1))

    def read(self, key: str) -> np.ndarray:
        if key not in self.state:
            raise ValueError(f"key {key!r} is not in {self.file}, though the index names that file for it")
        # A copy out of the mapped file (torch allocates 64-byte aligned), so that no parameter
        # aliases the file: rewriting it later could not corrupt (SIGBUS) a loaded model.
        tensor = self.state[key].clone()
        if tensor.dtype == self.torch.bfloat16:  # numpy has no bfloat16: view the bits
            return tensor.view(self.torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()

    def close(self):
        self.state = None
