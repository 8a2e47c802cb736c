"""Read GGUF checkpoints (llama.cpp's single-file format) of the Llama and Qwen2 families.

A GGUF file holds metadata (architecture, sizes, tokenizer) and tensors under llama.cpp's names,
each stored in numpy order [rows, cols] = torch Linear [out, in], possibly block-quantised. The
loader (models/hf_io.py `load_pretrained`) reads it as if it were a Hugging Face folder:

    config.json dict  <- the metadata keys ({arch}.block_count -> num_hidden_layers, ...)
    HF tensor name    <- the GGUF name (blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight)
    W                 = dequantize(stored bytes)   (gguf.quants: every llama.cpp type -> float32)
    W_q, W_k (llama)  = unpermute(W): llama.cpp's converter reorders each head's rows from
                        rotate-half order [x_0..x_{D/2-1}, x_{D/2}..x_{D-1}] to interleaved pairs
                        (x_0, x_{D/2}, x_1, x_{D/2+1}, ...); rows [H, 2, D/2] were stored as
                        [H, D/2, 2], so the inverse views them as [H, D/2, 2] and swaps back.
                        Qwen2 files keep the HF order (llama.cpp runs Qwen2 with NEOX RoPE).

then the family's key map places the tensors and the loader casts them to the requested dtype.
A model without `output.weight` ties its head to `token_embd.weight` (SmolLM2).

    model, params = load_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf", jnp.float32)
    model, params = load_pretrained("folder/holding/one/gguf", jnp.bfloat16, lora=lora_cfg)

The metadata is parsed once per file version (cached on path, size and mtime); tensors are read
from the file one at a time into fresh buffers, so no memory map outlives a load. gguf's reader
takes ~3 s over SmolLM2's 49152-token vocabulary, so a GGUF inside the hub cache
(cgc_lora_jax/hub.py) also keeps its parsed header beside it, `<file>.header` (JSON; valid while the
file's size and mtime are those it records), and later processes read that instead.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}  # fmt: skip
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def find_gguf(path: str | os.PathLike) -> Path | None:
    """The GGUF file `path` names: itself if it is a .gguf file, the one .gguf in a folder without
    config.json (a Hugging Face folder wins), else None."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        raise ValueError(f"{path} holds {len(files)} GGUF files ({', '.join(f.name for f in files)}): "
                         "pass the one to load")
    return files[0] if files else None


def hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor name; unknown names come back unchanged, so the
    loader reports them as unexpected keys."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    match = _BLOCK_NAME.fullmatch(gguf_name)
    if match is None or match[2] not in _BLOCK_NAMES:
        return gguf_name
    return f"model.layers.{match[1]}.{_BLOCK_NAMES[match[2]]}.{match[3]}"


class TensorInfo(NamedTuple):
    name: str  # GGUF name
    qtype: Any  # gguf.GGMLQuantizationType
    stored_shape: tuple[int, ...]  # numpy shape of the stored items (bytes rows for quantised types)
    stored_dtype: np.dtype  # item dtype (uint8 for quantised types)
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFCheckpoint(NamedTuple):
    """A parsed GGUF file: metadata values, tensor locations, and the config.json it implies."""

    file: Path
    metadata: dict[str, Any]  # every key-value pair, as Python values
    tensors: dict[str, TensorInfo]  # by HF name
    hf_config: dict  # a Hugging Face config.json dict for the family

    def unpermute_heads(self, name: str) -> int | None:
        """How many heads llama.cpp's converter permuted in tensor `name` (None: not permuted)."""
        if self.hf_config["model_type"] != "llama":
            return None
        if ".self_attn.q_proj." in name:
            return self.hf_config["num_attention_heads"]
        if ".self_attn.k_proj." in name:
            return self.hf_config["num_key_value_heads"]
        return None


def read_gguf(file: str | os.PathLike) -> GGUFCheckpoint:
    """Parse `file`'s header (cached while the file is unchanged); errors name the file and key."""
    file = Path(file).absolute()
    stat = file.stat()
    return _parse(str(file), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _parse(path: str, size: int, mtime_ns: int) -> GGUFCheckpoint:
    file = Path(path)
    header = _read_header(file, size, mtime_ns)
    if header is None:
        header = _parse_header(file, size)
        if _in_hub_cache(file):
            _write_header(file, size, mtime_ns, *header)
    metadata, tensors = header
    hf_config = _hf_config(file, metadata, tensors)
    _check_complete(file, hf_config, tensors)
    return GGUFCheckpoint(file, metadata, tensors, hf_config)


HEADER_FORMAT = 1  # version of the `<file>.header` layout


def _header_file(file: Path) -> Path:
    return file.with_name(file.name + ".header")  # not .json: run fingerprints hash a folder's .json files


def _in_hub_cache(file: Path) -> bool:
    from cgc_lora_jax.cache import cache_dir

    return file.resolve().is_relative_to(cache_dir().resolve())


def _read_header(file: Path, size: int, mtime_ns: int) -> tuple[dict, dict[str, TensorInfo]] | None:
    """The parsed header kept beside `file`, or None when there is none or it is not this version of
    the file (any unreadable or stale header is ignored: the file itself is parsed again)."""
    from gguf import GGMLQuantizationType

    try:
        saved = json.loads(_header_file(file).read_text(encoding="utf-8"))
        if (saved["format"], saved["size"], saved["mtime_ns"]) != (HEADER_FORMAT, size, mtime_ns):
            return None
        tensors = {hf: TensorInfo(name, GGMLQuantizationType(qtype), tuple(shape), np.dtype(dtype), offset, nbytes)
                   for hf, name, qtype, shape, dtype, offset, nbytes in saved["tensors"]}
        return saved["metadata"], tensors
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_header(file: Path, size: int, mtime_ns: int, metadata: dict, tensors: dict[str, TensorInfo]) -> None:
    rows = [[hf, t.name, int(t.qtype), list(t.stored_shape), t.stored_dtype.str, t.offset, t.nbytes]
            for hf, t in tensors.items()]
    text = json.dumps({"format": HEADER_FORMAT, "size": size, "mtime_ns": mtime_ns, "metadata": metadata,
                       "tensors": rows})
    target = _header_file(file)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    except OSError:  # a read-only cache: parse again next time
        tmp.unlink(missing_ok=True)


def _parse_header(file: Path, size: int) -> tuple[dict, dict[str, TensorInfo]]:
    """(metadata, {HF name: TensorInfo}) read by gguf's GGUFReader."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(file)
        metadata = {key: field.contents() for key, field in reader.fields.items()}
        tensors = {}
        for t in reader.tensors:
            info = TensorInfo(t.name, t.tensor_type, tuple(t.data.shape), t.data.dtype,
                              int(t.data_offset), int(t.data.nbytes))
            if info.offset + info.nbytes > size:
                raise ValueError(f"tensor {t.name!r} ends at byte {info.offset + info.nbytes}, past the end")
            tensors[hf_name(t.name)] = info
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt or truncated file
        raise ValueError(f"{file} is not a valid GGUF file (corrupt or truncated header): {e}") from e
    del reader  # drops the memory map
    return metadata, tensors


def _hf_config(file: Path, meta: dict, tensors: dict[str, TensorInfo]) -> dict:
    """The config.json dict of a Llama / Qwen2 GGUF (the keys llama.cpp's converter writes)."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{file}: general.architecture={arch!r} is not supported; "
                         f"known: {sorted(SUPPORTED_ARCHITECTURES)}")

    def need(key):
        if f"{arch}.{key}" not in meta:
            raise ValueError(f"{file}: metadata key {arch}.{key!r} is missing")
        value = meta[f"{arch}.{key}"]
        if isinstance(value, list):  # per-layer values (hybrid models): ours are uniform
            if len(set(value)) != 1:
                raise ValueError(f"{file}: {arch}.{key} varies per layer ({value}); not supported")
            value = value[0]
        return value

    if "rope_freqs.weight" in tensors:
        raise ValueError(f"{file}: tensor 'rope_freqs.weight' (llama3 RoPE frequency factors) is "
                         "not supported")
    if "model.embed_tokens.weight" not in tensors:
        raise ValueError(f"{file}: missing tensor 'token_embd.weight' (the token embeddings)")
    heads, hidden = int(need("attention.head_count")), int(need("embedding_length"))
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads) or heads)
    config = {
        "model_type": arch,
        "architectures": [SUPPORTED_ARCHITECTURES[arch]],
        "vocab_size": tensors["model.embed_tokens.weight"].stored_shape[0],
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": int(meta.get(f"{arch}.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 2048)),
        "hidden_act": "silu",
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "torch_dtype": "float32",
    }
    if arch == "llama":
        config["attention_bias"] = "model.layers.0.self_attn.o_proj.bias" in tensors
        config["mlp_bias"] = "model.layers.0.mlp.gate_proj.bias" in tensors
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
    elif scaling != "none":
        raise ValueError(f"{file}: {arch}.rope.scaling.type={scaling!r} is not supported "
                         "(only 'none' and 'linear')")
    for field, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                       ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            config[field] = int(meta[f"tokenizer.ggml.{key}"])
    return config


def _check_complete(file: Path, config: dict, tensors: dict[str, TensorInfo]) -> None:
    """Every tensor the architecture needs is present, named by its GGUF name when missing."""
    needed = ["output_norm.weight"]
    parts = ["attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
             "ffn_gate", "ffn_up", "ffn_down"]
    for i in range(config["num_hidden_layers"]):
        needed += [f"blk.{i}.{part}.weight" for part in parts]
        if config["model_type"] == "qwen2":
            needed += [f"blk.{i}.attn_{x}.bias" for x in "qkv"]
    present = {info.name for info in tensors.values()}
    missing = [name for name in needed if name not in present]
    if missing:
        raise ValueError(f"{file}: missing tensor {missing[0]!r} ({len(missing)} missing in all: "
                         f"{missing[:5]})")


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Invert llama.cpp's q/k permutation: per head, rows [D/2, 2] (interleaved) -> [2, D/2]."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFTensorReader:
    """The loader's reader protocol (keys, ordered, read, close) over one GGUF file, by HF name:
    read() returns the float32 tensor in Hugging Face layout."""

    def __init__(self, file: Path):
        self.checkpoint = read_gguf(file)
        self.handle = open(file, "rb", buffering=0)  # noqa: SIM115 - closed by close()

    def keys(self) -> list[str]:
        return list(self.checkpoint.tensors)

    def ordered(self, keys) -> list[str]:
        tensors = self.checkpoint.tensors
        return sorted(keys, key=lambda k: tensors[k].offset if k in tensors else -1)

    def read(self, key: str) -> np.ndarray:
        from gguf.quants import dequantize

        info = self.checkpoint.tensors.get(key)
        if info is None:
            raise ValueError(f"key {key!r} is not in {self.checkpoint.file}")
        raw = np.empty(info.nbytes, np.uint8)
        self.handle.seek(info.offset)
        if self.handle.readinto(memoryview(raw)) != info.nbytes:
            raise ValueError(f"{self.checkpoint.file} is truncated: tensor {info.name!r} ends past its end")
        stored = raw.view(info.stored_dtype).reshape(info.stored_shape)
        try:
            w = np.asarray(dequantize(stored, info.qtype), np.float32)
        except NotImplementedError as e:
            raise ValueError(f"{self.checkpoint.file}: tensor {info.name!r} has type {info.qtype.name}, "
                             f"which gguf cannot dequantize: {e}") from e
        heads = self.checkpoint.unpermute_heads(key)
        if heads is not None:
            w = unpermute_rows(w, heads)
        return np.ascontiguousarray(w)

    def close(self):
        self.handle.close()
