"""ChatGLM v1/v2/v3 tokenizers against the reference ids in ../shared/fixtures/chatglm/tokenizers.json."""
import json
from pathlib import Path

import numpy as np
import pytest

from cgc_lora_jax.models.chatglm_tokenizer import (ChatGLM2Tokenizer, ChatGLM3Tokenizer, ChatGLMTokenizerV1,
                                      load_tokenizer)
from conftest import CHATGLM_FIXTURES as FIXTURES

if not FIXTURES.is_dir():
    pytest.skip(reason=f"../shared is absent (no {FIXTURES})", allow_module_level=True)

REFERENCE = json.loads((FIXTURES / "tokenizers.json").read_text(encoding="utf-8"))["versions"]
VERSIONS = ("v1", "v2", "v3")
CASES = [(version, case) for version in VERSIONS for case in REFERENCE[version]["cases"]]
CASE_IDS = [f"{version}-{case['text']!r}" for version, case in CASES]
_LOADED = {}


def tokenizer(version):
    if version not in _LOADED:
        folder = FIXTURES / Path(REFERENCE[version]["vocab_file"]).parent
        _LOADED[version] = load_tokenizer(folder, version=version)
    return _LOADED[version]


@pytest.mark.parametrize("version,case", CASES, ids=CASE_IDS)
def test_encode_tokenize_decode(version, case):
    tok = tokenizer(version)
    text = case["text"]
    assert tok.encode(text) == case["ids"]
    assert tok.encode(text, add_special_tokens=False) == case["ids_no_special"]
    assert tok.tokenize(text) == case["tokens"]
    assert tok.decode(case["ids"]) == case["decode"]
    assert tok.decode(case["ids_no_special"]) == case["decode_no_special"]


@pytest.mark.parametrize("version", VERSIONS)
def test_batch_example(version):
    expected = REFERENCE[version]["batch_example"]
    batch = tokenizer(version)(expected["texts"], padding=True)
    array_keys = [key for key in expected if key not in ("texts", "call")]
    assert sorted(batch) == sorted(array_keys)
    for key in array_keys:
        np.testing.assert_array_equal(batch[key].astype(np.int64), np.asarray(expected[key]), err_msg=key)
    if version == "v1":
        assert batch["attention_mask"].dtype == bool


@pytest.mark.parametrize("version", VERSIONS)
def test_special_ids_and_sizes(version):
    tok, ref = tokenizer(version), REFERENCE[version]
    names = ref["special_ids"]
    assert tok.pad_token_id == ref["pad_token_id"]
    assert tok.eos_token_id == ref["eos_token_id"]
    assert tok.vocab_size == len(tok) == ref["vocab_size"] == ref["len_tokenizer"]
    assert tok.mask_token_id == names["[MASK]"]
    assert tok.gmask_token_id == names["[gMASK]"]
    sop_name = "<sop>" if version == "v1" else "sop"
    assert tok.sop_token_id == tok.bos_token_id == names[sop_name]
    for name, token_id in names.items():
        if name in tok.special_ids:
            assert tok.special_ids[name] == token_id, name


def test_v1_padding_to_max_length_keeps_real_positions():
    tok = tokenizer("v1")
    unpadded = tok("你好")
    padded = tok(["你好"], max_length=unpadded["input_ids"].shape[0] + 3)
    n = unpadded["input_ids"].shape[0]
    np.testing.assert_array_equal(padded["position_ids"][0][:, 3:], unpadded["position_ids"])
    np.testing.assert_array_equal(padded["attention_mask"][0][0, 3:, 3:], unpadded["attention_mask"][0])
    assert padded["attention_mask"][0][0, :3].all() and padded["attention_mask"][0][0, :, :3].all()
    assert padded["input_ids"].shape == (1, n + 3)


def test_v1_long_blank_runs_round_trip():
    tok = tokenizer("v1")
    text = "a" + " " * 81 + "b" + " " * 162 + "c\t\n"
    assert tok.decode(tok.encode(text)) == text


def test_folder_detection(tmp_path):
    assert type(load_tokenizer(FIXTURES / "tokenizer-v1")) is ChatGLMTokenizerV1
    assert type(load_tokenizer(FIXTURES / "tokenizer-v2")) is ChatGLM2Tokenizer
    v3_folder = tmp_path / "chatglm3"
    v3_folder.mkdir()
    (v3_folder / "tokenizer.model").symlink_to(FIXTURES / "tokenizer-v2" / "tokenizer.model")
    (v3_folder / "tokenizer_config.json").write_text(json.dumps({"name_or_path": "THUDM/chatglm3-6b"}))
    assert type(load_tokenizer(v3_folder)) is ChatGLM3Tokenizer


def test_bad_folder_names_folder_and_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_tokenizer(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message and "ice_text.model" in message and "tokenizer.model" in message
    with pytest.raises(FileNotFoundError, match="ice_text.model"):
        load_tokenizer(FIXTURES / "tokenizer-v2", version="v1")
    with pytest.raises(ValueError, match="v1"):
        load_tokenizer(FIXTURES / "tokenizer-v2", version="chatglm4")
