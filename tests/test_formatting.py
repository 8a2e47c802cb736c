"""Tests for cgc_lora_jax/formatting.py: the ChatGLM v1 / v2 training layouts reproduce the
supervised batches of ../shared/fixtures/chatglm (train_input_ids / train_labels, made by the
original recipes), the real tokenizers give the documented structure on the real PromptCBLUE
records, truncation is counted, and Llama/Qwen2 layouts work with a tiny local HF tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cgc_lora_jax.data.batching import make_batch
from cgc_lora_jax.data.records import read_records
from cgc_lora_jax.loss import IGNORE
from cgc_lora_jax.run import load_tokenizer
from cgc_lora_jax.data.formatting import (PromptFormat, encode_split, layout_of,
                                     truncate)
from cgc_lora_jax.data.task_vocab import TaskVocab
from conftest import SHARED

FIXTURES = SHARED / "fixtures" / "chatglm"
PROMPTCBLUE = SHARED / "data" / "promptcblue"
if not FIXTURES.is_dir():
    pytest.skip(f"../shared is absent (no {FIXTURES})", allow_module_level=True)

TOKENIZER_DIRS = {"chatglm": FIXTURES / "tokenizer-v1", "chatglm2": FIXTURES / "tokenizer-v2"}


class FixtureTokenizer:
    """Encodes each text to ids given in advance, with the tiny fixture models' special ids."""

    def __init__(self, reference, texts: dict[str, list[int]]):
        self.texts = texts
        self.gmask_token_id = int(reference["special_gmask_id"])
        sop_key = "special_bos_id" if "special_bos_id" in reference else "special_sop_id"
        self.sop_token_id = int(reference[sop_key])
        self.eos_token_id = int(reference["special_eos_id"])
        self.pad_token_id = int(reference["special_pad_id"])

    def encode(self, text, add_special_tokens=False):
        assert not add_special_tokens
        return self.texts[text]


def fixture_prompt_and_target(version, ids, labels):
    """Split a fixture row (padding removed) into its prompt and target text ids."""
    start = int(np.argmax(labels != IGNORE))  # first labelled position
    if version == "v1":  # P + [gMASK, <sop>] + Y + [<eop>]; the label at <sop> is <sop>
        return list(ids[:start - 1]), list(ids[start + 1:-1])
    return list(ids[2:start]), list(ids[start:-1])  # [gMASK, sop] + P + Y + [eos]


@pytest.mark.parametrize("version,family", [("v1", "chatglm"), ("v2", "chatglm2"),
                                            ("v3", "chatglm3")])
def test_reproduces_fixture_training_batch(version, family):
    reference = np.load(FIXTURES / version / "reference.npz")
    texts, rows = {}, []
    for i, (ids, labels, valid) in enumerate(zip(reference["train_input_ids"],
                                                  reference["train_labels"],
                                                  reference["train_valid_mask"])):
        n = int(valid.sum())
        texts[f"prompt {i}"], texts[f"target {i}"] = fixture_prompt_and_target(
            version, ids[:n], labels[:n])
        rows.append({"input": f"prompt {i}", "target": f"target {i}", "task_dataset": "A",
                     "sample_id": str(i)})
    split = encode_split(rows, FixtureTokenizer(reference, texts), family=family,
                         vocab=TaskVocab(["A"]))
    batch = make_batch(split, np.arange(len(rows)), pad_multiple=reference["train_input_ids"].shape[1])
    np.testing.assert_array_equal(batch.input_ids, reference["train_input_ids"])
    np.testing.assert_array_equal(batch.labels, reference["train_labels"])
    np.testing.assert_array_equal(batch.attention_mask, reference["train_valid_mask"])
    assert not split.truncated


@pytest.fixture(scope="module")
def train_records():
    if not (PROMPTCBLUE / "train.json").is_file():
        pytest.skip(f"shared PromptCBLUE records are absent ({PROMPTCBLUE})")
    return read_records(PROMPTCBLUE / "train.json")[0]


@pytest.fixture(scope="module", params=["chatglm", "chatglm2"])
def chatglm(request):
    return request.param, load_tokenizer(request.param, TOKENIZER_DIRS[request.param])


def test_real_tokenizer_structure(train_records, chatglm):
    family, tok = chatglm
    vocab = TaskVocab.from_data(train_records["task_dataset"])
    split = encode_split(train_records, tok, family=family, vocab=vocab)
    gmask, sop, eos = tok.gmask_token_id, tok.sop_token_id, tok.eos_token_id
    for row, ids, labels, task_id in zip(train_records, split.input_ids, split.labels,
                                         split.task_ids):
        prompt = tok.encode(row["input"], add_special_tokens=False)[:1023]  # default budgets
        target = tok.encode(row["target"], add_special_tokens=False)[:194]
        start = int(np.argmax(labels != IGNORE))
        assert np.all(labels[:start] == IGNORE) and np.all(labels[start:] != IGNORE)
        assert ids[-1] == eos and list(ids).count(gmask) == 1 and list(ids).count(sop) == 1
        if family == "chatglm":  # context = prompt + [gMASK]; <sop> is labelled with itself
            assert start == len(prompt) + 1 and ids[start - 1] == gmask and ids[start] == sop
            np.testing.assert_array_equal(labels[start:], ids[start:])
            assert list(ids[:start - 1]) == prompt and list(ids[start + 1:-1]) == target
        else:  # context = [gMASK, sop] + prompt
            assert list(ids[:2]) == [gmask, sop] and start == 2 + len(prompt)
            assert list(ids[2:start]) == prompt
            assert list(labels[start:-1]) == target and labels[-1] == eos
        assert vocab.name(int(task_id)) == row["task_dataset"]
    assert split.pad_id == tok.pad_token_id


def test_prediction_prompts_equal_reference_encode(train_records, chatglm):
    """Generation prompts are what the original tokenizer's encode(text) returns (v1: text +
    [gMASK, <sop>]; v2: [gMASK, sop] + text)."""
    family, tok = chatglm
    split = encode_split(train_records, tok, family=family, max_source_len=4096,
                         vocab=TaskVocab.from_data(train_records["task_dataset"]),
                         for_prediction=True)
    assert split.labels is None and split.sample_ids == list(train_records["sample_id"])
    for row, ids in zip(train_records, split.input_ids):
        assert list(ids) == tok.encode(row["input"])


def test_truncation_is_counted(train_records, chatglm):
    family, tok = chatglm
    max_source, max_target = 64, 16
    split = encode_split(train_records, tok, family=family, max_source_len=max_source,
                         max_target_len=max_target,
                         vocab=TaskVocab.from_data(train_records["task_dataset"]))
    prompt_lengths = [len(tok.encode(t, add_special_tokens=False)) for t in train_records["input"]]
    target_lengths = [len(tok.encode(t, add_special_tokens=False)) for t in train_records["target"]]
    expected = {"source": sum(n > max_source - 1 for n in prompt_lengths),
                "target": sum(n > max_target - 2 for n in target_lengths)}
    assert dict(split.truncated) == expected and min(expected.values()) > 0
    assert split.lengths.max() <= max_source + max_target
    labelled = [int((labels != IGNORE).sum()) for labels in split.labels]
    # glm_v1 labels <sop> + Y + <eop>; glm_v2 labels Y + eos.
    extra = 2 if family == "chatglm" else 1
    assert labelled == [min(n, max_target - 2) + extra for n in target_lengths]


def test_truncate_keeps_the_beginning():
    prompt, target, cut = truncate(list(range(10)), list(range(20, 30)), 5, 6)
    assert prompt == [0, 1, 2, 3] and target == [20, 21, 22, 23] and cut == ["source", "target"]
    assert truncate([1], [2], 5, 6)[2] == []
    with pytest.raises(ValueError):
        truncate([1], [2], 1, 6)


def tiny_hf_tokenizer(folder: Path, with_bos: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<s>", "</s>", "what", "colour", "is", "the", "sky", "?", "blue"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    special = dict(bos_token="<s>") if with_bos else {}
    wrapped = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="<unk>",
                                      pad_token="<pad>" if with_bos else None, **special)
    wrapped.save_pretrained(folder)
    return words


@pytest.mark.parametrize("family,with_bos", [("llama", True), ("qwen2", False)])
def test_bos_eos_layout_with_local_hf_tokenizer(tmp_path, family, with_bos):
    words = tiny_hf_tokenizer(tmp_path, with_bos)
    tok = load_tokenizer(family, tmp_path)
    ids_of = {w: i for i, w in enumerate(words)}
    rows = [{"input": "what colour is the sky ?", "target": "blue", "task_dataset": "A",
             "sample_id": "1"}]
    split = encode_split(rows, tok, family=family, vocab=TaskVocab(["A"]))
    prompt = [ids_of[w] for w in "what colour is the sky ?".split()]
    bos = [ids_of["<s>"]] if with_bos else []
    answer = [ids_of["blue"], ids_of["</s>"]]
    assert list(split.input_ids[0]) == bos + prompt + answer
    assert list(split.labels[0]) == [IGNORE] * (len(bos) + len(prompt)) + answer
    assert split.pad_id == (ids_of["<pad>"] if with_bos else ids_of["</s>"])
    prompts = encode_split(rows, tok, family=family, vocab=TaskVocab(["A"]), for_prediction=True)
    assert list(prompts.input_ids[0]) == bos + prompt


def test_layout_names_and_unknown_family():
    assert [layout_of(f) for f in ("chatglm", "chatglm2", "chatglm3", "llama", "qwen2")] == [
        "glm_v1", "glm_v2", "glm_v2", "bos_eos", "bos_eos"]
    with pytest.raises(ValueError, match="no prompt format for model family 'gpt2'"):
        PromptFormat.for_tokenizer("gpt2", None)


def test_truncate_middle_keeps_the_head_and_the_end():
    prompt = list(range(100))
    kept, target, cut = truncate(prompt, [7, 8], 21, 6, where="middle")
    # budget 20: the first 20 // 4 = 5 ids, then the last 15
    assert kept == [0, 1, 2, 3, 4] + list(range(85, 100)) and target == [7, 8] and cut == ["source"]
    assert truncate(list(range(20)), [1], 21, 6, where="middle")[0] == list(range(20))  # fits: untouched
    with pytest.raises(ValueError, match="data.truncate"):
        truncate(prompt, [1], 21, 6, where="start")


def test_middle_truncation_keeps_the_options_and_answer_cue(chatglm):
    """A PromptCBLUE prompt whose middle (the record) is long: cut from the end it loses its
    options and answer cue; cut from the middle it keeps the instruction, options and cue."""
    family, tok = chatglm
    head, options = "判断下面搜索词的意图：\n", "\n选项：病情诊断，后果表述，病因分析\n答："
    row = {"input": head + "输卵管堵塞造成不孕是怎么造成呢？" * 12 + options, "target": "病因分析",
           "task_dataset": "KUAKE-QIC", "sample_id": "1"}
    vocab = TaskVocab(("KUAKE-QIC",))
    decode = lambda split: tok.decode([int(i) for i in split.input_ids[0]])
    n_head = len(tok.encode(head, add_special_tokens=False))
    budget = 4 * (n_head + 1) + 1  # the kept head (budget // 4) covers the instruction
    budget = max(budget, 4 * len(tok.encode(options, add_special_tokens=False)) // 3 + 8)
    end = encode_split([row], tok, family=family, vocab=vocab, max_source_len=budget, for_prediction=True)
    middle = encode_split([row], tok, family=family, vocab=vocab, max_source_len=budget, for_prediction=True,
                          truncate_where="middle")
    assert end.truncated["source"] == middle.truncated["source"] == 1
    assert "答" not in decode(end) and "选项" not in decode(end)
    text = decode(middle)
    # (ChatGLM-6B's tokenizer gives full-width punctuation back half-width)
    assert text.count("判断下面搜索词的意图") == 1
    assert text.replace("，", ",").replace("：", ":").endswith("病情诊断,后果表述,病因分析\n答:")
