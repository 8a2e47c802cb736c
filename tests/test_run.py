"""cgc_lora_jax/run/: base loading (built-in and HF folder), the run folder's data and task
vocabulary, and attaching adapters only to the base they were trained on."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cgc_lora_jax.config import load_config
from cgc_lora_jax.data.task_vocab import TaskVocab
from cgc_lora_jax.models.family import FAMILIES, with_default_targets
from cgc_lora_jax.params import split_params
from cgc_lora_jax.run import (VOCAB_FILE, BaseMismatchError, answering_model_config, attach_adapters, data_folder, fingerprint_base, load_base,
                              load_frozen_base, lora_config, read_data, save_adapters)
from conftest import CHATGLM_FIXTURES, rel_err

DEMO = load_config("demo_tiny")


def test_builtin_base_is_seeded_and_adapters_follow_the_run_seed():
    lora = lora_config(DEMO.lora, 3)
    a = load_base(DEMO.model, lora=lora, seed=1)
    b = load_base(DEMO.model, lora=lora, seed=2)
    base_a, adapters_a = split_params(a.params)
    base_b, adapters_b = split_params(b.params)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(base_a), jax.tree.leaves(base_b)))
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(adapters_a), jax.tree.leaves(adapters_b)))
    assert a.info == b.info and a.info["path"] == "builtin:tiny-chatglm"
    plain = load_frozen_base("builtin:tiny-chatglm")
    assert plain.info == a.info and not split_params(plain.params)[1]
    # B starts at zero: the base with fresh adapters computes the plain base's logits
    ids = jnp.asarray([a.tokenizer.encode("把数字写成汉字：305\n答：")], jnp.int32)
    with_adapters = a.model.apply({"params": a.params}, ids, None, jnp.zeros((1,), jnp.int32))
    np.testing.assert_array_equal(with_adapters, plain.model.apply({"params": plain.params}, ids))


def test_a_base_loaded_without_a_mesh_is_committed_to_the_first_device():
    """The built-in base as loaded GGUF / HF bases are (tests/test_gguf.py checks what it is for: the
    merged task weights reuse the base's generation program)."""
    base = load_base(DEMO.model, lora=lora_config(DEMO.lora, 3), seed=0)
    leaves = jax.tree.leaves(base.params)
    assert leaves and all(leaf.committed and leaf.devices() == {jax.devices()[0]} for leaf in leaves)


def test_hf_folder_base_matches_the_reference_logits():
    folder = CHATGLM_FIXTURES / "v1"
    if not (folder / "reference.npz").is_file():
        pytest.skip(f"{folder} is absent (the shared ChatGLM fixtures)")
    base = load_frozen_base(str(folder), with_tokenizer=False)
    assert base.family == "chatglm" and base.tokenizer is None
    assert base.info == {"path": str(folder.resolve()), "fingerprint": fingerprint_base(folder)}
    ref = np.load(folder / "reference.npz")
    logits = base.model.apply({"params": base.params}, jnp.asarray(ref["single_input_ids"]))
    assert rel_err(logits, ref["single_logits"]) < 1e-4


def test_missing_folder_names_the_path_and_how_to_get_it(tmp_path):
    cfg = load_config("promptcblue", [f"model.path={tmp_path}"])
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*huggingface-cli download"):
        load_base(cfg.model, lora=None)


def test_demo_data_is_generated_once_and_the_saved_vocab_wins(tmp_path):
    folder = data_folder(DEMO.data, tmp_path)
    assert folder == tmp_path / "data" and (folder / "train.json").is_file()
    stamp = (folder / "train.json").stat().st_mtime_ns
    assert data_folder(DEMO.data, tmp_path) == folder and (folder / "train.json").stat().st_mtime_ns == stamp
    splits, vocab = read_data(DEMO.data, tmp_path, seed=DEMO.train.seed, splits=("train",))
    assert vocab.tasks == tuple(sorted({r["task_dataset"] for r in splits.datasets["train"]}))
    TaskVocab(tuple(reversed(vocab.tasks))).save(tmp_path / VOCAB_FILE)
    assert read_data(DEMO.data, tmp_path, seed=DEMO.train.seed, splits=("train",))[1].tasks == tuple(reversed(vocab.tasks))


def test_an_empty_data_path_is_an_error_naming_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path is empty.*--config.data.path=FOLDER"):
        data_folder(load_config("base").data, tmp_path)  # the schema names no dataset

def test_adapters_attach_only_to_their_base(tmp_path):
    lora = lora_config(DEMO.lora, 3)
    trained = load_base(DEMO.model, lora=lora, seed=3)
    _, adapters = split_params(trained.params)
    meta = {"config": DEMO.to_dict(), "task_vocab": ["a", "b", "c"], "base": trained.info}
    save_adapters(tmp_path / "adapters", jax.device_get(adapters), json.loads(json.dumps(meta, default=list)))
    plain = load_frozen_base("builtin:tiny-chatglm")
    attached = attach_adapters(plain, tmp_path)
    # an empty lora.targets resolves to the family's default (the paper's four ChatGLM layers)
    assert attached.vocab.tasks == ("a", "b", "c") and attached.lora == with_default_targets(FAMILIES["chatglm"], lora)
    assert attached.lora.targets == r"(query_key_value|dense|dense_h_to_4h|dense_4h_to_h)$"
    flat = traverse_util.flatten_dict(split_params(attached.params)[1])
    for path, leaf in traverse_util.flatten_dict(adapters).items():
        np.testing.assert_array_equal(flat[path], leaf)
    assert all(x is y for x, y in zip(jax.tree.leaves(split_params(attached.params)[0]), jax.tree.leaves(plain.params)))
    plain.info = {**plain.info, "fingerprint": "0" * 64}
    with pytest.raises(BaseMismatchError, match="was trained on base"):
        attach_adapters(plain, tmp_path)


def test_answering_model_config_takes_eval_dtype_over_model_dtype():
    cfg = load_config("demo", ["model.dtype=bfloat16"])  # a concrete training dtype that differs
    assert cfg.model.dtype == "bfloat16" and cfg.eval.dtype == "float32"
    answering = answering_model_config(cfg)
    assert answering.dtype == "float32"
    assert {k: v for k, v in answering.items() if k != "dtype"} == {k: v for k, v in cfg.model.items() if k != "dtype"}
    assert cfg.model.dtype == "bfloat16"  # the run's own config is left as it is
    unset = load_config("demo", ["model.dtype=bfloat16", "eval.dtype="])
    assert answering_model_config(unset).dtype == "bfloat16"
