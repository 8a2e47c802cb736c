"""A character-level tokenizer for the demo that behaves like the ChatGLM-6B (v1) tokenizer.

It needs no downloaded file: one id per character of `demo_alphabet()`, after the special tokens

    0 <unk>   1 <pad>   2 [MASK]   3 [gMASK]   4 <sop> (bos)   5 <eop> (eos)   6.. characters

It is a `ChatGLMTokenizerV1` (models/chatglm_tokenizer.py) with the same interface, so the
ChatGLM v1 formatting, batching and generation code applies unchanged:

    encode(text)                            = char_ids + [gMASK, <sop>]
    encode(text, add_special_tokens=False)  = char_ids       (an unknown character -> <unk>)
    decode(ids)                             = the characters; special ids and <unk> give ""
    tok(texts)                              left-padded batch with GLM's mask and 2-D positions

`save(folder)` writes folder/demo_tokenizer.json (the id -> token list), which `load(folder)`
reads back, so a run reloads exactly the vocabulary it was trained with.

Usage::

    tok = DemoTokenizer.build(); tok.save(run_dir / "tokenizer")
    tok = DemoTokenizer.load(run_dir / "tokenizer")
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from cgc_lora_jax.models.chatglm_tokenizer import ChatGLMTokenizerV1

from cgc_lora_jax.demo.dataset import demo_alphabet

FILE_NAME = "demo_tokenizer.json"
SPECIAL_TOKENS = ("<unk>", "<pad>", "[MASK]", "[gMASK]", "<sop>", "<eop>")
_FORMAT = "cgc-lora-jax demo character tokenizer"


class DemoTokenizer(ChatGLMTokenizerV1):
    """Character tokenizer with the ChatGLM-6B special tokens; see the module docstring."""

    def __init__(self, tokens: Sequence[str]):  # no sentencepiece model, so no super().__init__
        tokens = list(tokens)
        if tuple(tokens[:len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"a demo vocabulary starts with {SPECIAL_TOKENS}, got "
                             f"{tokens[:len(SPECIAL_TOKENS)]}")
        characters = tokens[len(SPECIAL_TOKENS):]
        if any(len(c) != 1 for c in characters) or len(set(characters)) != len(characters):
            raise ValueError("the demo vocabulary must list distinct single characters after the "
                             "special tokens")
        self.model_file = None
        self.tokens = tokens
        self.special_ids = {name: i for i, name in enumerate(SPECIAL_TOKENS)}
        self._char_ids = {c: i for i, c in enumerate(tokens) if i >= len(SPECIAL_TOKENS)}

    @classmethod
    def build(cls, alphabet: str | None = None) -> DemoTokenizer:
        """The tokenizer of `alphabet` (default: every character the demo data can contain)."""
        characters = sorted(set(demo_alphabet() if alphabet is None else alphabet))
        return cls(list(SPECIAL_TOKENS) + characters)

    vocab_size = property(lambda self: len(self.tokens))

    def tokenize(self, text: str) -> list[str]:
        return [c if c in self._char_ids else "<unk>" for c in text]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        unk = self.special_ids["<unk>"]
        ids = [self._char_ids.get(c, unk) for c in text]
        return ids + [self.gmask_token_id, self.sop_token_id] if add_special_tokens else ids

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.tokens[int(i)] for i in ids
                       if len(SPECIAL_TOKENS) <= int(i) < len(self.tokens))

    def save(self, folder: str | os.PathLike) -> Path:
        """Write folder/demo_tokenizer.json; returns its path."""
        path = Path(folder) / FILE_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        content = {"format": _FORMAT, "tokens": self.tokens}
        path.write_text(json.dumps(content, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> DemoTokenizer:
        path = Path(folder) / FILE_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {FILE_NAME} in {folder}; write one with "
                                    "DemoTokenizer.build().save(folder)")
        content = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(content, dict) or content.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a demo tokenizer file (format {_FORMAT!r})")
        return cls(content["tokens"])

    @staticmethod
    def is_saved_in(folder: str | os.PathLike) -> bool:
        return (Path(folder) / FILE_NAME).is_file()
