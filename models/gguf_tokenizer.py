"""The tokenizer a GGUF file describes, built with the `tokenizers` library (no torch).

llama.cpp stores a byte-level BPE tokenizer (`tokenizer.ggml.model = "gpt2"`: GPT-2, SmolLM,
Qwen2, Llama 3) as its vocabulary (`tokens`, already spelled in GPT-2's byte alphabet), its merge
list, a type per token (3 = control, 4 = user-defined) and the name of the pre-tokenizer regex
(`tokenizer.ggml.pre`). Encoding then is:

    text -> split on special (control) tokens -> pre-tokenize (regex of `pre`) -> bytes as
    GPT-2 characters -> BPE merges in rank order -> ids           (+ bos first if add_bos_token)

transformers can build the same from a GGUF (`AutoTokenizer.from_pretrained(folder,
gguf_file=...)`), but its GGUF reader imports torch, which the core install leaves out; the tests
check that both give the same ids and the same chat-template text.

    tokenizer = gguf_tokenizer(Path("SmolLM2-135M-Instruct.Q4_1.gguf"))
    tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
"""

from __future__ import annotations

from pathlib import Path

from cgc_lora_jax.models.gguf import read_gguf

# `tokenizer.ggml.pre` -> the split regex before byte-level BPE; None: GPT-2's own regex.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = _QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
PRE_TOKENIZER_SPLITS = {
    "default": None, "gpt2": None, "smollm": None,
    "qwen2": _QWEN2_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT,
}  # fmt: skip
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def gguf_tokenizer(file: Path):
    """A transformers PreTrainedTokenizerFast equal to the GGUF's tokenizer (byte-level BPE only);
    errors name the file and the metadata key at fault."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    meta = read_gguf(file).metadata

    def need(key):
        if f"tokenizer.ggml.{key}" not in meta:
            raise ValueError(f"{file}: metadata key 'tokenizer.ggml.{key}' is missing (no tokenizer)")
        return meta[f"tokenizer.ggml.{key}"]

    kind, pre = need("model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise ValueError(f"{file}: tokenizer.ggml.model={kind!r}; only byte-level BPE ('gpt2') is read "
                         "from GGUF: put the model's tokenizer.json beside the .gguf file instead")
    if pre not in PRE_TOKENIZER_SPLITS:
        raise ValueError(f"{file}: tokenizer.ggml.pre={pre!r} is not known; known: "
                         f"{sorted(PRE_TOKENIZER_SPLITS)}")
    tokens, types = need("tokens"), meta.get("tokenizer.ggml.token_type") or []
    merges = [tuple(m.split(" ", 1)) for m in need("merges")]
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS[pre]
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (<|im_end|>, ...) are matched whole and are special; user-defined ones are
    # matched whole but decoded like text.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind == CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind in zip(tokens, types) if kind == USER_DEFINED])

    def token(key):
        index = meta.get(f"tokenizer.ggml.{key}")
        return None if index is None else tokens[index]

    bos = token("bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"), pad_token=token("padding_token_id"),
        chat_template=meta.get("tokenizer.chat_template"), clean_up_tokenization_spaces=False)
