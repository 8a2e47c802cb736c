"""Tiny GGUF files for the tests, written with the `gguf` writer the way llama.cpp's converter
writes them: q/k rows permuted for Llama, no output.weight when the head is tied, matrices
block-quantised (norms and biases stay float32), a byte-level BPE tokenizer with ChatML."""

from pathlib import Path

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
SIZES = dict(hidden=64, ffn=128, layers=2, heads=4, kv_heads=2)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "Ġ i", "Ġi n", "2 0", "Ġ 2"]  # digit merges tell the regexes apart
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
          " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_vocab() -> list[str]:
    """GPT-2's byte-level alphabet: every byte as one printable character."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    return [chars[b] for b in range(256)]


def tokenizer_tokens() -> tuple[list[str], list[int]]:
    tokens = SPECIALS + byte_vocab() + [m.replace(" ", "") for m in MERGES]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))  # 3 = control, 1 = normal
    return tokens, types


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Llama q/k rows (rotate-half halves -> interleaved pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, arch: str, qtype, seed: int = 0, tied: bool = True) -> dict:
    """A random tiny model written as a GGUF; returns its HF-layout float32 weights (pre-quantisation)."""
    rng = np.random.default_rng(seed)
    tokens, types = tokenizer_tokens()
    vocab, h, f = len(tokens), SIZES["hidden"], SIZES["ffn"]
    heads, kv, d = SIZES["heads"], SIZES["kv_heads"], SIZES["hidden"] // SIZES["heads"]

    def w(*shape, scale=0.08):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    weights = {"token_embd.weight": w(vocab, h, scale=0.5), "output_norm.weight": 1 + w(h, scale=0.1)}
    if not tied:
        weights["output.weight"] = w(vocab, h)
    for i in range(SIZES["layers"]):
        b = f"blk.{i}."
        weights |= {b + "attn_norm.weight": 1 + w(h, scale=0.1), b + "ffn_norm.weight": 1 + w(h, scale=0.1),
                    b + "attn_q.weight": w(heads * d, h), b + "attn_k.weight": w(kv * d, h),
                    b + "attn_v.weight": w(kv * d, h), b + "attn_output.weight": w(h, heads * d),
                    b + "ffn_gate.weight": w(f, h), b + "ffn_up.weight": w(f, h), b + "ffn_down.weight": w(h, f)}
        if arch == "qwen2":
            weights |= {b + "attn_q.bias": w(heads * d, scale=0.1), b + "attn_k.bias": w(kv * d, scale=0.1),
                        b + "attn_v.bias": w(kv * d, scale=0.1)}
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(SIZES["layers"])
    writer.add_context_length(256)
    writer.add_embedding_length(h)
    writer.add_feed_forward_length(f)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0 if arch == "llama" else 1e6)
    if arch == "llama":
        writer.add_rope_dimension_count(d)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default" if arch == "llama" else "qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
    for name, value in weights.items():
        stored = value
        if arch == "llama" and ".attn_q." in name:
            stored = llama_cpp_permute(value, heads)
        elif arch == "llama" and ".attn_k." in name:
            stored = llama_cpp_permute(value, kv)
        if value.ndim == 2 and qtype not in (Q.F32, Q.F16):
            writer.add_tensor(name, gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
        elif value.ndim == 2 and qtype == Q.F16:
            writer.add_tensor(name, stored.astype(np.float16))
        else:
            writer.add_tensor(name, stored)  # norms and biases stay float32, as llama.cpp keeps them
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


