"""Hostile input, property-based (hypothesis): whatever the bytes or values, each entry point
either works or raises its own error naming the file and line (or key); nothing else escapes.

    data readers      arbitrary bytes and arbitrary JSON values -> DataError "FILE:LINE: ..."
                      (on_error="error") or a counted skip (on_error="skip")
    config overrides  arbitrary keys and values -> ConfigError naming the key (parse_args: exit 2)
    eval.py score     arbitrary prediction files -> exit 0 with scores, or exit 2 and one line
    safetensors       corrupted headers -> ValueError naming the file
    GGUF              corrupted headers -> ValueError naming the file (models/gguf.py)

Example counts are modest in the default run (the "default" profile, below); set
HYPOTHESIS_PROFILE=thorough for a long search.
"""

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from cgc_lora_jax.config import ConfigError, apply_overrides, load_config
from cgc_lora_jax.data.records import DataError, read_records

settings.register_profile("default", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

FORMATS = ("promptcblue", "firefly", "jsonl")
JSONL_FIELDS = dict(input_field="question", target_field="answer", task_field="task")
# JSON values, including what Python's json accepts beyond the standard (NaN, huge integers).
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=12,
)
FIELD_NAMES = ["input", "target", "task_dataset", "task_type", "sample_id", "answer_choices", "kind",
               "question", "answer", "task"]
# Records that look like the formats' records, with any values: the interesting near misses.
records = st.dictionaries(st.sampled_from(FIELD_NAMES), json_values | st.text(min_size=1), max_size=8)


def read(path, data_format, on_error):
    extra = JSONL_FIELDS if data_format == "jsonl" else {}
    return read_records(path, data_format=data_format, on_error=on_error, **extra)


def check_reader_contract(path: Path, data_format: str, lines: int):
    """on_error="error": rows, or DataError naming path:line; on_error="skip": never raises, and
    every non-blank line is kept, skipped (counted by reason) or filtered."""
    try:
        dataset, _ = read(path, data_format, "error")
    except DataError as e:
        assert str(e).startswith(f"{path}:"), str(e)
        line = int(str(e)[len(f"{path}:"):].split(":")[0])
        assert 1 <= line <= lines
    else:
        assert all(isinstance(x, str) for x in dataset["input"])
    dataset, summary = read(path, data_format, "skip")
    assert summary.kept == len(dataset)
    assert summary.kept + sum(summary.skipped.values()) + sum(summary.filtered.values()) <= lines


@pytest.mark.parametrize("data_format", FORMATS)
@given(blob=st.binary(max_size=600))
@example(blob=b"[" * 100_000)  # nesting deeper than Python's recursion limit
@example(blob=b'{"input": "a", "target": "b", "task_dataset": "t", "sample_id": ' + b"9" * 5000 + b"}")
@example(blob=b'{"input": "\\ud800", "target": "b", "task_dataset": "t", "sample_id": "1"}')  # lone surrogate
@example(blob=b'\xef\xbb\xbf{"input": "a", "target": "b", "task_dataset": "t", "sample_id": "1"}')  # BOM
def test_readers_on_arbitrary_bytes(tmp_path, data_format, blob):
    path = tmp_path / "train.json"
    path.write_bytes(blob)
    check_reader_contract(path, data_format, blob.count(b"\n") + 1)


@pytest.mark.parametrize("data_format", FORMATS)
@given(values=st.lists(json_values | records, min_size=1, max_size=6))
def test_readers_on_arbitrary_json_values(tmp_path, data_format, values):
    path = tmp_path / "train.json"
    path.write_text("".join(json.dumps(v) + "\n" for v in values))
    check_reader_contract(path, data_format, len(values))


CONFIG = load_config("demo_tiny")


def flat_keys(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from flat_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


VALID_KEYS = sorted(flat_keys(CONFIG.to_dict()))


def config_value(cfg, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


@given(key=st.sampled_from(VALID_KEYS) | st.text(max_size=30) | st.sampled_from(["train", "lora.", ".", ""]),
       value=st.text(max_size=30) | st.sampled_from(["nan", "-inf", "1e999", "9" * 5000, "1,2,x", "None", "true"]),
       prefix=st.sampled_from(["", "--config.", "config."]), sep=st.sampled_from(["=", ""]))
def test_config_overrides_with_arbitrary_keys_and_values(key, value, prefix, sep):
    override = f"{prefix}{key}{sep}{value}"
    try:
        cfg = apply_overrides(load_config("demo_tiny"), [override])
    except ConfigError as e:
        assert ("not KEY=VALUE" in str(e) or "unknown config key" in str(e) or "expected" in str(e)), str(e)
        return
    stripped = override.partition("=")[0].removeprefix("--config.").removeprefix("config.")
    assert stripped in VALID_KEYS  # only a real key is accepted ...
    default, value = config_value(CONFIG, stripped), config_value(cfg, stripped)
    assert default is None or value is None or isinstance(value, type(default))  # ... with its type


@given(argv=st.lists(st.text(max_size=20) | st.sampled_from(["--config", "demo_tiny", "--config.train.steps=x",
                                                            "--workdir", "--config.nope=1"]), max_size=5))
def test_train_py_arguments_exit_with_usage_errors_only(argv):
    import argparse

    from cgc_lora_jax.config import parse_args_with_config

    parser = argparse.ArgumentParser(prog="train.py")
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", default=None)
    try:
        parse_args_with_config(parser, argv)
    except SystemExit as e:
        assert e.code == 2  # argparse's usage error, with the message on stderr


def _demo_gold(folder: Path) -> Path:
    from cgc_lora_jax.demo.dataset import write_demo_dataset

    if not (folder / "test.json").is_file():
        write_demo_dataset(folder, seed=0)
    return folder / "test.json"


@pytest.fixture(scope="module")
def gold(tmp_path_factory) -> list:
    path = _demo_gold(tmp_path_factory.mktemp("demo"))
    return path, [json.loads(line) for line in path.read_text().splitlines()[:12]]


def run_score(tmp_path, gold_records, prediction_text: str | bytes, capsys):
    import eval as eval_py

    gold_file, pred_file, out = tmp_path / "gold.json", tmp_path / "pred.json", tmp_path / "scores.json"
    gold_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in gold_records))
    (pred_file.write_bytes if isinstance(prediction_text, bytes) else pred_file.write_text)(prediction_text)
    code = eval_py.main(["score", "--pred", str(pred_file), "--gold", str(gold_file), "--out", str(out),
                         "--benchmark", "demo"])
    err = capsys.readouterr().err
    assert code in (0, 2), code
    if code == 2:
        assert err.startswith("eval.py: error: ") and (str(pred_file) in err or str(gold_file) in err), err
    else:
        scores = json.loads(out.read_text())
        assert all(0.0 <= v <= 1.0 for v in scores.values()), scores


@given(answers=st.lists(st.text(max_size=40) | json_values, min_size=12, max_size=12))
def test_score_on_arbitrary_model_outputs(tmp_path, gold, capsys, answers):
    """The gold's records with any values as `target`: a string always scores; a non-string is
    an error naming the line."""
    _, records = gold
    predictions = [{**r, "target": a} for r, a in zip(records, answers)]
    run_score(tmp_path, records, "".join(json.dumps(p) + "\n" for p in predictions), capsys)


@given(blob=st.binary(max_size=400) | st.lists(json_values | records, max_size=6).map(
    lambda vs: "".join(json.dumps(v) + "\n" for v in vs)))
@example(blob=b"[" * 100_000)
@example(blob=b'{"sample_id": ' + b"9" * 5000 + b', "target": "x"}')
@example(blob=b'{"sample_id": "\\ud800", "target": "\\udfff", "task_dataset": "\\ud800"}')
def test_score_on_arbitrary_prediction_files(tmp_path, gold, capsys, blob):
    run_score(tmp_path, gold[1], blob, capsys)


def _safetensors_file(path: Path) -> bytes:
    from safetensors.numpy import save_file

    save_file({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.int64)}, str(path))
    return path.read_bytes()


def _check_weights(path: Path):
    from cgc_lora_jax.models.weight_reader import open_weights

    try:
        with open_weights(path) as reader:
            for key in reader.keys():
                reader.read(key)
    except ValueError as e:
        assert str(path) in str(e), str(e)


@given(data=st.data())
def test_safetensors_with_corrupted_headers(tmp_path, data):
    path = tmp_path / "model.safetensors"
    valid = _safetensors_file(path)
    (header_len,) = struct.unpack("<Q", valid[:8])
    how = data.draw(st.sampled_from(["flip", "truncate", "length", "json"]))
    if how == "flip":  # bytes changed inside the length prefix or the JSON header
        blob = bytearray(valid)
        for _ in range(data.draw(st.integers(1, 4))):
            blob[data.draw(st.integers(0, 8 + header_len - 1))] = data.draw(st.integers(0, 255))
        blob = bytes(blob)
    elif how == "truncate":
        blob = valid[:data.draw(st.integers(0, len(valid) - 1))]
    elif how == "length":
        blob = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1))) + valid[8:]
    else:  # any JSON header, with a consistent length
        header = json.dumps(data.draw(json_values | st.dictionaries(
            st.sampled_from(["a", "b", "__metadata__"]),
            st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "I64", "F16", "XX"]) | json_values,
                                   "shape": st.lists(st.integers(-3, 10), max_size=3) | json_values,
                                   "data_offsets": st.lists(st.integers(-8, 100), min_size=2, max_size=2) | json_values}),
            max_size=3))).encode()
        blob = struct.pack("<Q", len(header)) + header + valid[8 + header_len:]
    assume(blob != valid)
    path.write_bytes(blob)
    _check_weights(path)


@given(data=st.data())
def test_gguf_with_corrupted_headers(tmp_path, data):
    from cgc_lora_jax.models.gguf import read_gguf
    from tests.tiny_gguf import Q, write_tiny_gguf

    path = tmp_path / "model.gguf"
    if not path.exists():
        write_tiny_gguf(path, "llama", Q.F32)
    valid = path.read_bytes()
    blob = bytearray(valid)
    if data.draw(st.booleans()):
        blob = blob[:data.draw(st.integers(0, len(valid) - 1))]
    else:  # magic, version, counts, the metadata key/values and the tensor infos
        header_end = min(len(valid), data.draw(st.sampled_from([64, 1024, 8192])))
        for _ in range(data.draw(st.integers(1, 4))):
            blob[data.draw(st.integers(0, header_end - 1))] = data.draw(st.integers(0, 255))
    assume(bytes(blob) != valid)
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(bytes(blob))
    try:
        read_gguf(corrupt)
    except ValueError as e:
        assert str(corrupt) in str(e), str(e)
