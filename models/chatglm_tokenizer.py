"""ChatGLM tokenizers (v1 ChatGLM-6B, v2 ChatGLM2-6B, v3 ChatGLM3-6B) over plain `sentencepiece`.

They reproduce the ids, tokens and decoded text of the original Hugging Face remote-code tokenizers
(transformers 4.33) without importing transformers.

Id layouts
----------
v1 (`ice_text.model`, built with num_image_tokens=0, so sentencepiece ids are model ids; 130344):
    0 <unk>, 1 <s>, 2 </s>, 3 <pad>, 4 <n>, 5 "▁", ... text pieces ...,
    130000 [MASK], 130001 [gMASK], 130002 [sMASK], 130003 <unused_0>, 130004 <sop> (bos),
    130005 <eop> (eos), 130006 <ENC>, 130007 <dBLOCK>, 130008 <|tab|>,
    130009..130087 <|blank_2|>..<|blank_80|>, then byte-fallback pieces <0x00>..<0xFF>.
  Text is rewritten before sentencepiece, and back after decoding: "\\n" -> "<n>", "\\t" -> "<|tab|>",
  a run of k >= 2 spaces -> "<|blank_k|>" (runs longer than 80 split into <|blank_80|> chunks).
  encode(text) = text_ids + [gMASK, <sop>]. A batch is left-padded with <pad> and carries GLM's
  [B, 1, L, L] bool mask (True = masked) and [B, 2, L] positions (models/glm_layout.py, which the
  model uses too).

v2 (`tokenizer.model`, 64789 pieces): 0 <unk> (also the pad id), 1 <s>, 2 </s> (eos); five ids
  after the sentencepiece vocabulary: 64789 [MASK], 64790 [gMASK], 64791 [sMASK], 64792 sop,
  64793 eop. encode(text) = [gMASK, sop] + text_ids. A batch is left-padded with 0 and carries
  attention_mask [B, L] (1 = token) and position_ids [B, L] (0 on pads, then 0..n-1).

v3: the v2 file and ids plus 64794 <|system|>, 64795 <|user|>, 64796 <|assistant|>,
  64797 <|observation|>. Decoding keeps special tokens as text ("[gMASK]sop ...") where v2 drops
  them.

In every version, special-token strings inside `text` (e.g. "<|user|>", "[gMASK]") are encoded as
plain text, unlike transformers, which splits them out; insert their ids from `special_ids` instead.

Usage:
    tok = load_tokenizer("path/to/tokenizer_dir")      # v1/v2/v3 picked from the folder
    ids = tok.encode("你好")                             # with the [gMASK]/sop special tokens
    batch = tok(["你好", "请问感冒了怎么办？"])             # dict of numpy arrays, left-padded
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import sentencepiece as spm

from cgc_lora_jax.models.glm_layout import glm_layout

# Tokenizer version of each ChatGLM family name (None: read from the folder's files).
CHATGLM_VERSIONS = {"chatglm": "v1", "chatglm2": None, "chatglm3": "v3"}

VERSIONS = ("v1", "v2", "v3")
V1_MODEL_FILE = "ice_text.model"
V2_MODEL_FILE = "tokenizer.model"  # shared by ChatGLM2-6B and ChatGLM3-6B
_V1_MAX_BLANK = 80
_V1_BLANK_RE = re.compile(r"<\|blank_(\d+)\|>")
# transformers' clean_up_tokenization, which the v1 tokenizer applies on decode (v2/v3 turn it off).
_CLEANUP_PAIRS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                  (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class _ChatGLMTokenizer:
    """Shared batching; subclasses define tokenize/encode/decode and how a batch is padded."""

    version: str
    model_file_name: str
    padding_side = "left"

    def __init__(self, model_file: str | Path):
        self.model_file = str(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=self.model_file)
        self.special_ids: dict[str, int] = {}

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def mask_token_id(self) -> int:
        return self.special_ids["[MASK]"]

    @property
    def gmask_token_id(self) -> int:
        return self.special_ids["[gMASK]"]

    @property
    def bos_token_id(self) -> int:
        """The start-of-generation token: <sop> in v1, sop in v2/v3 (sentencepiece <s> is never used)."""
        return self.sop_token_id

    def __call__(self, texts: str | Sequence[str], padding: bool = True,
                 max_length: int | None = None) -> dict[str, np.ndarray]:
        """`tokenizer(texts, padding=True)`: encode with special tokens and left-pad to the longest
        (or to `max_length`). A single string gives arrays without the batch axis."""
        single = isinstance(texts, str)
        rows = [self.encode(text) for text in ([texts] if single else texts)]
        longest = max(len(ids) for ids in rows)
        length = longest if max_length is None else max_length
        if length < longest:
            raise ValueError(f"max_length={max_length} is shorter than the longest sequence ({longest} ids)")
        if not padding and any(len(ids) != length for ids in rows):
            raise ValueError("sequences have different lengths; call with padding=True")
        batch = self._pad_batch(rows, length)
        return {key: value[0] for key, value in batch.items()} if single else batch

    def _pad_batch(self, rows: list[list[int]], length: int) -> dict[str, np.ndarray]:
        """input_ids [B, length] left-padded with pad_token_id, and the version's mask and positions."""
        raise NotImplementedError


class ChatGLMTokenizerV1(_ChatGLMTokenizer):
    """ChatGLM-6B tokenizer (ice_text.model, num_image_tokens=0)."""

    version = "v1"
    model_file_name = V1_MODEL_FILE

    def __init__(self, model_file: str | Path):
        super().__init__(model_file)
        names = ("<unk>", "</s>", "<pad>", "<n>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>")
        self.special_ids = {name: self.sp.piece_to_id(name) for name in names}
        unknown = [name for name in names[1:] if self.special_ids[name] == self.sp.unk_id()]
        if unknown:
            raise ValueError(f"{self.model_file} is not the ChatGLM-6B ice_text.model: it lacks {unknown}")

    vocab_size = property(lambda self: self.sp.vocab_size())
    sop_token_id = property(lambda self: self.special_ids["<sop>"])
    eos_token_id = property(lambda self: self.special_ids["<eop>"])
    pad_token_id = property(lambda self: self.special_ids["<pad>"])

    @staticmethod
    def _blank_run(match: re.Match) -> str:
        full, rest = divmod(len(match.group(0)), _V1_MAX_BLANK)
        tail = "" if rest == 0 else " " if rest == 1 else f"<|blank_{rest}|>"
        return f"<|blank_{_V1_MAX_BLANK}|>" * full + tail

    def _preprocess(self, text: str) -> str:
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        return re.sub(r" {2,}", self._blank_run, text)

    def tokenize(self, text: str) -> list[str]:
        return self.sp.encode(self._preprocess(text), out_type=str)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.sp.encode(self._preprocess(text))
        return ids + [self.gmask_token_id, self.sop_token_id] if add_special_tokens else ids

    def decode(self, ids: Sequence[int]) -> str:
        # Control pieces ([gMASK], <sop>, ...) decode to nothing; pads are dropped first, as in the original.
        pieces = [self.sp.id_to_piece(int(i)) for i in ids if int(i) != self.pad_token_id]
        text = self.sp.decode_pieces(pieces).replace("<n>", "\n").replace("<|tab|>", "\t")
        text = _V1_BLANK_RE.sub(lambda m: " " * int(m.group(1)) if 2 <= int(m.group(1)) <= _V1_MAX_BLANK
                                else m.group(0), text)
        for before, after in _CLEANUP_PAIRS:
            text = text.replace(before, after)
        return text

    def _pad_batch(self, rows: list[list[int]], length: int) -> dict[str, np.ndarray]:
        input_ids = np.asarray([[self.pad_token_id] * (length - len(ids)) + ids for ids in rows], np.int32)
        real = np.asarray([[False] * (length - len(ids)) + [True] * len(ids) for ids in rows])
        layout = glm_layout(input_ids, real, self)  # bos = <sop>, [MASK] and [gMASK] ids from self
        return {
            "input_ids": input_ids,
            "attention_mask": ~np.asarray(layout.visible),  # True = masked, as the original
            "position_ids": np.asarray(layout.position_ids),
        }


class ChatGLM2Tokenizer(_ChatGLMTokenizer):
    """ChatGLM2-6B tokenizer (tokenizer.model + five ids after the sentencepiece vocabulary)."""

    version = "v2"
    model_file_name = V2_MODEL_FILE
    extra_tokens: tuple[str, ...] = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
    keep_special_text = False  # v2 decodes special ids to nothing, v3 to their names

    def __init__(self, model_file: str | Path):
        super().__init__(model_file)
        first_extra = self.sp.vocab_size()
        self.special_ids = {name: first_extra + i for i, name in enumerate(self.extra_tokens)}
        self.special_ids.update(
            {"<unk>": self.sp.unk_id(), "<s>": self.sp.bos_id(), "</s>": self.sp.eos_id()})
        self._extra_names = {first_extra + i: name for i, name in enumerate(self.extra_tokens)}

    vocab_size = property(lambda self: self.sp.vocab_size() + len(self.extra_tokens))
    sop_token_id = property(lambda self: self.special_ids["sop"])
    eos_token_id = property(lambda self: self.sp.eos_id())
    pad_token_id = property(lambda self: self.sp.unk_id())

    def tokenize(self, text: str) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.sp.encode(text)
        return [self.gmask_token_id, self.sop_token_id] + ids if add_special_tokens else ids

    def _piece(self, i: int) -> str:
        if i in self._extra_names:
            return self._extra_names[i] if self.keep_special_text else ""
        if i in (self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()) or not 0 <= i < self.sp.vocab_size():
            return ""
        return self.sp.id_to_piece(i)

    def decode(self, ids: Sequence[int]) -> str:
        # A special name is an unknown piece to sentencepiece, which emits it verbatim; it also stops
        # sentencepiece from dropping the next piece's leading "▁" ("[gMASK]sop 你好").
        return self.sp.decode_pieces([self._piece(int(i)) for i in ids])

    def _pad_batch(self, rows: list[list[int]], length: int) -> dict[str, np.ndarray]:
        pads = [length - len(ids) for ids in rows]
        return {
            "input_ids": np.asarray([[self.pad_token_id] * pad + ids for pad, ids in zip(pads, rows)], np.int32),
            "attention_mask": np.asarray([[0] * pad + [1] * len(ids) for pad, ids in zip(pads, rows)], np.int32),
            "position_ids": np.asarray([[0] * pad + list(range(len(ids))) for pad, ids in zip(pads, rows)], np.int32),
        }


class ChatGLM3Tokenizer(ChatGLM2Tokenizer):
    """ChatGLM3-6B tokenizer: the v2 model file plus four chat role tokens."""

    version = "v3"
    extra_tokens = ChatGLM2Tokenizer.extra_tokens + (
        "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
    keep_special_text = True


_CLASSES = {"v1": ChatGLMTokenizerV1, "v2": ChatGLM2Tokenizer, "v3": ChatGLM3Tokenizer}


def _config_says_chatglm3(folder: Path) -> bool:
    """ChatGLM3's tokenizer_config.json names the chatglm3 repo (or, in later revisions, its role tokens)."""
    config_file = folder / "tokenizer_config.json"
    if not config_file.is_file():
        return False
    text = config_file.read_text(encoding="utf-8")
    return "chatglm3" in text.lower() or "<|user|>" in text


def load_tokenizer(path: str | Path, version: str | None = None) -> _ChatGLMTokenizer:
    """Load the ChatGLM tokenizer in folder `path`.

    version None picks it from the folder: ice_text.model -> v1; tokenizer.model -> v3 when
    tokenizer_config.json names ChatGLM3, else v2. Pass "v1", "v2" or "v3" to force one.
    """
    folder = Path(path)
    if version is not None and version not in VERSIONS:
        raise ValueError(f"unknown ChatGLM tokenizer version {version!r}; choose one of {VERSIONS}")
    has_v1, has_v2 = (folder / V1_MODEL_FILE).is_file(), (folder / V2_MODEL_FILE).is_file()
    if version is None:
        if has_v1 and has_v2:
            raise ValueError(f"{folder} holds both {V1_MODEL_FILE} and {V2_MODEL_FILE}; pass version=")
        if not (has_v1 or has_v2):
            raise FileNotFoundError(f"no ChatGLM tokenizer model in {folder}: expected {V1_MODEL_FILE} "
                                    f"(ChatGLM-6B, v1) or {V2_MODEL_FILE} (ChatGLM2/3-6B, v2/v3)")
        version = "v1" if has_v1 else "v3" if _config_says_chatglm3(folder) else "v2"
    if version == "v1":
        config_file = folder / "tokenizer_config.json"
        image_tokens = (json.loads(config_file.read_text(encoding="utf-8")).get("num_image_tokens", 0)
                        if config_file.is_file() else 0)
        if image_tokens != 0:
            raise ValueError(f"{config_file} has num_image_tokens={image_tokens}; only 0 is supported")
    cls = _CLASSES[version]
    model_file = folder / cls.model_file_name
    if not model_file.is_file():
        raise FileNotFoundError(f"ChatGLM tokenizer {version} needs {cls.model_file_name} in {folder}")
    return cls(model_file)
