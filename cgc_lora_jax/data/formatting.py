"""Per-family prompt formatting: (prompt, target) text -> (input_ids, labels), loss on the target only.

P = prompt ids, Y = target ids (both encoded without special tokens), -100 = no loss:

    layout   families          input_ids                        labels
    glm_v1   chatglm (+ demo)  P + [gMASK, <sop>] + Y + [<eop>]  -100 * (|P| + 1) + [<sop>] + Y + [<eop>]
    glm_v2   chatglm2/3        [gMASK, sop] + P + Y + [eos]      -100 * (2 + |P|) + Y + [eos]
    bos_eos  llama, qwen2      [bos] + P + Y + [eos]             -100 * (1 + |P|) + Y + [eos]
    chat     any, with a chat  C_pre + P + C_post + Y + [end]    -100 * |C_pre + P + C_post| + Y + [end]
             template

chat is the default (`prompt_format="auto"`) for a tokenizer that carries a chat template (instruct
bases: ChatML for SmolLM2 and Qwen2): C_pre + P + C_post is exactly
`tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)`
(C_pre / C_post are what the template puts around the user's message, system prompt included), and
[end] is the token the template closes the assistant's turn with (<|im_end|>); the loss covers the
answer and that end token only. "plain" keeps the family's layout; "chat" requires a template.

glm_v1 is the MOELoRA / ChatGLM-6B p-tuning recipe: labels = -100 over the context (everything
before <sop>), then the ids themselves, so the label at <sop> is <sop> and the loss includes
predicting <sop> from [gMASK]. glm_v2 is the ChatGLM2-6B recipe. bos_eos drops [bos] when the
tokenizer has none (Qwen2). Generation prompts are the input_ids up to the target:
P + [gMASK, <sop>], [gMASK, sop] + P, [bos] + P.

Truncation uses MOELoRA's budgets in every layout: P keeps its first max_source_len - 1 ids (or,
with truncate_where="middle", its first quarter of that budget and the rest from its end, so
answer options and the answer cue survive; `truncate`) and Y its first max_target_len - 2 (defaults 1024 and 196), so a sequence never exceeds
max_source_len + max_target_len ids
(plus the template's own ids in the chat layout). Each truncated example is counted under "source" and/or
"target" in `EncodedSplit.truncated`, for the training log.

Usage::

    tok = run.load_tokenizer("chatglm", "checkpoints/chatglm-6b")
    train = encode_split(splits.datasets["train"], tok, family="chatglm", vocab=splits.vocab)
    train.input_ids[0], train.labels[0], train.task_ids[0], dict(train.truncated)
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence

import numpy as np

from cgc_lora_jax.data.task_vocab import TaskVocab
from cgc_lora_jax.loss import IGNORE

FAMILY_LAYOUTS = {"chatglm": "glm_v1", "chatglm2": "glm_v2", "chatglm3": "glm_v2",
                  "llama": "bos_eos", "qwen2": "bos_eos"}
PROMPT_FORMATS = ("auto", "chat", "plain")  # data.prompt_format
PROMPT_FORMATS = ("auto", "chat", "plain")  # data.prompt_format


def layout_of(family: str) -> str:
    if family not in FAMILY_LAYOUTS:
        raise ValueError(f"no prompt format for model family {family!r}; known: "
                         f"{sorted(FAMILY_LAYOUTS)}")
    return FAMILY_LAYOUTS[family]


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """One layout with the tokenizer's special ids."""

    layout: str
    eos_id: int  # <eop> for glm_v1
    pad_id: int  # fills right-padded batches; labels there are -100 whatever it is
    gmask_id: int | None = None
    sop_id: int | None = None
    bos_id: int | None = None  # bos_eos only; None when the tokenizer has no bos
    chat_prefix: tuple[int, ...] = ()  # chat only: template ids before the user's message
    chat_suffix: tuple[int, ...] = ()  # chat only: template ids after it, up to the answer

    @classmethod
    def for_tokenizer(cls, family: str, tokenizer, prompt_format: str = "auto") -> PromptFormat:
        """The layout of `family` (prompt_format "plain"), or of the tokenizer's chat template
        ("chat"; "auto": chat when the tokenizer has a template)."""
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"data.prompt_format={prompt_format!r}: expected one of {PROMPT_FORMATS}")
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if prompt_format == "chat" and not has_template:
            raise ValueError(f"data.prompt_format='chat', but the {family} tokenizer has no chat template; "
                             "use 'plain' or 'auto'")
        if prompt_format != "plain" and has_template:
            return cls._chat(tokenizer)
        layout = layout_of(family)
        if layout in ("glm_v1", "glm_v2"):
            return cls(layout, tokenizer.eos_token_id, tokenizer.pad_token_id,
                       tokenizer.gmask_token_id, tokenizer.sop_token_id)
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the {family} tokenizer has no eos token; targets need one")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(layout, tokenizer.eos_token_id, pad, bos_id=tokenizer.bos_token_id)

    @classmethod
    def _chat(cls, tokenizer) -> PromptFormat:
        """Split the template around a probe message, and check that the split reproduces it."""
        probe, answer = "\u2063probe\u2063", "\u2063answer\u2063"
        user = [{"role": "user", "content": probe}]
        text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        before, sep, after = text.partition(probe)
        if not sep:
            raise ValueError("the tokenizer's chat template does not show the user's message; use "
                             "data.prompt_format=plain")
        fmt = cls("chat", eos_id=-1, pad_id=-1, chat_prefix=tuple(_ids(tokenizer, before)),
                  chat_suffix=tuple(_ids(tokenizer, after)))
        prompt, target = _ids(tokenizer, probe), _ids(tokenizer, answer)
        whole = _chat_ids(tokenizer, [*user, {"role": "assistant", "content": answer}], False)
        start = fmt.prompt_ids(prompt) + target
        if _chat_ids(tokenizer, user, True) != fmt.prompt_ids(prompt) or whole[: len(start)] != start \
                or len(whole) == len(start):
            raise ValueError("the tokenizer's chat template does not split into prompt + answer + end "
                             "token; use data.prompt_format=plain")
        end = whole[len(start)]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
        return dataclasses.replace(fmt, eos_id=end, pad_id=pad)

    def _prefix(self) -> list[int]:
        if self.layout == "glm_v2":
            return [self.gmask_id, self.sop_id]
        return [] if self.layout == "glm_v1" or self.bos_id is None else [self.bos_id]

    def prompt_ids(self, prompt: Sequence[int]) -> list[int]:
        """The generation prompt: the input ids that precede the target."""
        if self.layout == "chat":
            return [*self.chat_prefix, *prompt, *self.chat_suffix]
        suffix = [self.gmask_id, self.sop_id] if self.layout == "glm_v1" else []
        return self._prefix() + list(prompt) + suffix

    def training_ids(self, prompt: Sequence[int], target: Sequence[int]) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of one example, untruncated."""
        context = self.prompt_ids(prompt)
        if self.layout == "glm_v1":
            context = context[:-1]  # <sop> starts the labelled part
            answer = [self.sop_id, *target, self.eos_id]
        else:
            answer = [*target, self.eos_id]
        return context + answer, [IGNORE] * len(context) + answer


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _chat_ids(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return _ids(tokenizer, text)


TRUNCATE = ("end", "middle")
HEAD_SHARE = 4  # "middle" keeps the first 1/HEAD_SHARE of the prompt budget, the rest from the end


def truncate(prompt: Sequence[int], target: Sequence[int], max_source_len: int,
             max_target_len: int, where: str = "end") -> tuple[list[int], list[int], list[str]]:
    """Keep max_source_len - 1 prompt ids and the first max_target_len - 2 target ids; also
    return which parts were cut ("source", "target").

    where="end" keeps the prompt's first ids. where="middle" cuts the middle of the prompt: it
    keeps the first budget // HEAD_SHARE ids and the rest of the budget from the end. A
    PromptCBLUE prompt opens with a short instruction and ends with its answer options and
    answer cue ("...选项：A，B，C\n答："), so cutting its end would remove what the answer is
    chosen from; its long part is the text in between (a record, a dialogue).
    """
    if max_source_len < 2 or max_target_len < 3:
        raise ValueError(f"need max_source_len >= 2 and max_target_len >= 3, got "
                         f"{max_source_len} and {max_target_len}")
    if where not in TRUNCATE:
        raise ValueError(f"data.truncate={where!r}: expected one of {TRUNCATE}")
    budget = max_source_len - 1
    cut = [name for name, ids, limit in (("source", prompt, budget), ("target", target, max_target_len - 2))
           if len(ids) > limit]
    if where == "middle" and len(prompt) > budget:
        head = budget // HEAD_SHARE
        kept = list(prompt[:head]) + list(prompt[len(prompt) - (budget - head):])
    else:
        kept = list(prompt[:budget])
    return kept, list(target[:max_target_len - 2]), cut


@dataclasses.dataclass
class EncodedSplit:
    """Token ids of one split. For prediction, input_ids are generation prompts and labels None."""

    input_ids: list[np.ndarray]  # int32 [length_i] each
    labels: list[np.ndarray] | None  # int32 [length_i] each; -100 = no loss
    task_ids: np.ndarray  # int32 [N]
    sample_ids: list[str]
    pad_id: int
    truncated: Counter  # "source" / "target" -> number of examples cut

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(ids) for ids in self.input_ids), np.int64, len(self.input_ids))


def encode_split(dataset, tokenizer, *, family: str, vocab: TaskVocab,
                 max_source_len: int = 1024, max_target_len: int = 196,
                 for_prediction: bool = False, prompt_format: str = "auto",
                 truncate_where: str = "end") -> EncodedSplit:
    """Tokenise rows with `input`, `target`, `task_dataset`, `sample_id` (a `data` Dataset or
    a list of such dicts); long prompts are cut at `truncate_where` (see `truncate`)."""
    fmt = PromptFormat.for_tokenizer(family, tokenizer, prompt_format)
    input_ids, labels, task_ids, sample_ids, truncated = [], [], [], [], Counter()
    for row in dataset:
        prompt = tokenizer.encode(row["input"], add_special_tokens=False)
        target = [] if for_prediction else tokenizer.encode(row["target"], add_special_tokens=False)
        prompt, target, cut = truncate(prompt, target, max_source_len, max_target_len, truncate_where)
        truncated.update(cut)
        if for_prediction:
            input_ids.append(np.asarray(fmt.prompt_ids(prompt), np.int32))
        else:
            ids, row_labels = fmt.training_ids(prompt, target)
            input_ids.append(np.asarray(ids, np.int32))
            labels.append(np.asarray(row_labels, np.int32))
        task_ids.append(vocab.id(row["task_dataset"]))
        sample_ids.append(row["sample_id"])
    return EncodedSplit(input_ids, None if for_prediction else labels,
                        np.asarray(task_ids, np.int32), sample_ids, fmt.pad_id, truncated)
