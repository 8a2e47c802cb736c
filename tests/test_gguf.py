"""GGUF checkpoints (models/gguf.py) against transformers loading the same file.

Each test writes a tiny Llama or Qwen2 GGUF with the `gguf` writer the way llama.cpp's converter
does (q/k rows permuted for Llama, no output.weight when the head is tied), unquantised or
block-quantised, then compares our logits and greedy ids with transformers'
`AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)` (its own dequantisation).
"""

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cgc_lora_jax.models.generate import generate  # noqa: E402
from cgc_lora_jax.models.gguf import find_gguf, read_gguf, unpermute_rows  # noqa: E402
from cgc_lora_jax.models.hf_io import load_pretrained  # noqa: E402
from tests.tiny_gguf import Q, llama_cpp_permute, write_tiny_gguf  # noqa: E402

TOL = 1e-5  # max|ours - transformers| / max|transformers|, float32


def reference(folder: Path, name: str):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=name, dtype=torch.float32, attn_implementation="eager").eval()


CASES = [("llama", Q.F32, True), ("llama", Q.Q8_0, True), ("llama", Q.Q4_1, False),
         ("qwen2", Q.F16, False), ("qwen2", Q.Q4_0, True)]


@pytest.mark.parametrize("arch,qtype,tied", CASES, ids=[f"{a}-{q.name}-{'tied' if t else 'head'}" for a, q, t in CASES])
def test_logits_and_greedy_ids_match_transformers(tmp_path, arch, qtype, tied):
    write_tiny_gguf(tmp_path / "tiny.gguf", arch, qtype, tied=tied)
    model, params = load_pretrained(tmp_path, jnp.float32)  # the folder holding one .gguf
    assert model.config.model_type == arch and model.config.tie_word_embeddings == tied
    ref = reference(tmp_path, "tiny.gguf")
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, (2, 12)).astype(np.int32)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    with torch.no_grad():
        theirs = ref(torch.from_numpy(ids).long()).logits.numpy()
    assert np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)) <= TOL

    new = np.asarray(generate(model, params, ids, np.ones_like(ids), None, max_new_tokens=8,
                              eos_token_id=-1, pad_token_id=0))
    with torch.no_grad():
        hf_new = ref.generate(torch.from_numpy(ids).long(), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:].numpy()
    np.testing.assert_array_equal(new, hf_new)


def test_unpermute_inverts_llama_cpp_and_dequantized_weights_land_in_place(tmp_path):
    w = np.arange(48 * 5, dtype=np.float32).reshape(48, 5)
    np.testing.assert_array_equal(unpermute_rows(llama_cpp_permute(w, 3), 3), w)
    weights = write_tiny_gguf(tmp_path / "m.gguf", "llama", Q.F32)
    _, params = load_pretrained(tmp_path / "m.gguf", jnp.float32)
    layer = params["model"]["layers_1"]
    np.testing.assert_array_equal(np.asarray(layer["self_attn"]["k_proj"]["kernel"]), weights["blk.1.attn_k.weight"].T)
    np.testing.assert_array_equal(np.asarray(layer["mlp"]["down_proj"]["kernel"]), weights["blk.1.ffn_down.weight"].T)


def test_bfloat16_load_is_the_float32_load_rounded(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", "qwen2", Q.Q8_0)
    _, p32 = load_pretrained(tmp_path, jnp.float32)
    _, p16 = load_pretrained(tmp_path, jnp.bfloat16)
    k32 = p32["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    k16 = p16["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert k16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(k16), np.asarray(k32.astype(jnp.bfloat16)))


def test_corrupted_header_is_a_named_error(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", "llama", Q.F32)
    data = bytearray((tmp_path / "m.gguf").read_bytes())
    data[:4] = b"XXXX"  # the magic
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"bad\.gguf is not a valid GGUF file .*header"):
        load_pretrained(tmp_path / "bad.gguf")
    (tmp_path / "cut.gguf").write_bytes(bytes((tmp_path / "m.gguf").read_bytes()[:5000]))
    with pytest.raises(ValueError, match=r"cut\.gguf is not a valid GGUF file"):
        load_pretrained(tmp_path / "cut.gguf")


def test_a_hub_cached_gguf_keeps_its_parsed_header_and_reads_it_back(tmp_path, monkeypatch):
    from cgc_lora_jax.models import gguf as gguf_module

    monkeypatch.setenv("CGC_LORA_JAX_CACHE", str(tmp_path / "cache"))
    cached, outside = tmp_path / "cache" / "base" / "m.gguf", tmp_path / "elsewhere" / "m.gguf"
    for file in (cached, outside):
        file.parent.mkdir(parents=True)
        write_tiny_gguf(file, "llama", Q.Q8_0)
    parsed = {file: read_gguf(file) for file in (cached, outside)}
    assert (cached.parent / "m.gguf.header").is_file()
    assert not (outside.parent / "m.gguf.header").exists()  # no files written beside a user's checkpoint

    def refuse(file, size):
        raise AssertionError(f"parsed {file} again")

    gguf_module._parse.cache_clear()
    monkeypatch.setattr(gguf_module, "_parse_header", refuse)
    again = read_gguf(cached)  # from the header file: the same checkpoint description
    assert (again.metadata, again.tensors, again.hf_config) == (parsed[cached].metadata, parsed[cached].tensors,
                                                              parsed[cached].hf_config)
    _, from_header = load_pretrained(cached, jnp.float32)
    gguf_module._parse.cache_clear()
    monkeypatch.undo()
    _, from_file = load_pretrained(outside, jnp.float32)
    np.testing.assert_array_equal(np.asarray(from_header["model"]["layers_1"]["self_attn"]["q_proj"]["kernel"]),
                                  np.asarray(from_file["model"]["layers_1"]["self_attn"]["q_proj"]["kernel"]))

    # a changed file (another mtime) or a damaged header file is parsed again, and the header rewritten
    monkeypatch.setenv("CGC_LORA_JAX_CACHE", str(tmp_path / "cache"))
    for damage in ("touch", "garbage"):
        if damage == "touch":
            os.utime(cached, ns=(cached.stat().st_atime_ns, cached.stat().st_mtime_ns + 10**9))
        else:
            (cached.parent / "m.gguf.header").write_text("{not json")
        gguf_module._parse.cache_clear()
        calls = []
        real = gguf_module._parse_header
        monkeypatch.setattr(gguf_module, "_parse_header", lambda file, size: calls.append(file) or real(file, size))
        assert read_gguf(cached).tensors == parsed[cached].tensors and calls == [cached]
        saved = json.loads((cached.parent / "m.gguf.header").read_text())
        assert saved["mtime_ns"] == cached.stat().st_mtime_ns
        monkeypatch.setattr(gguf_module, "_parse_header", real)


def test_missing_tensor_and_unsupported_architecture_are_named(tmp_path):
    (tmp_path / "a").mkdir()
    weights = write_tiny_gguf(tmp_path / "a" / "m.gguf", "llama", Q.F32)
    reader = gguf.GGUFReader(str(tmp_path / "a" / "m.gguf"))
    for drop, arch, expected in [("blk.1.ffn_up.weight", "llama", r"missing tensor 'blk\.1\.ffn_up\.weight'"),
                                 (None, "gpt2", r"general\.architecture='gpt2' is not supported")]:
        file = tmp_path / f"{arch}.gguf"
        writer = gguf.GGUFWriter(str(file), arch)
        for key, field in reader.fields.items():
            if key.startswith("llama."):
                value = field.contents()
                writer.add_key_value(key.replace("llama.", f"{arch}."), value, field.types[0])
        for name, value in weights.items():
            if name != drop:
                writer.add_tensor(name, value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with pytest.raises(ValueError, match=rf"{arch}\.gguf: {expected}"):
            read_gguf(file)


def test_find_gguf_prefers_an_hf_folder_and_refuses_ambiguity(tmp_path):
    assert find_gguf(tmp_path) is None
    (tmp_path / "a.gguf").write_bytes(b"")
    assert find_gguf(tmp_path) == tmp_path / "a.gguf"
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="holds 2 GGUF files"):
        find_gguf(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert find_gguf(tmp_path) is None


TEXTS = ["the theater in a tin", "  In 2024, 3.14 ther'e\n\n they'll  ", "<|im_start|>user\nthe<|im_end|>\n",
         "ünï 日本 🙂\tx", "trailing\n\n"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tokenizer_from_metadata_matches_transformers(tmp_path, arch):
    from cgc_lora_jax.run import load_tokenizer

    write_tiny_gguf(tmp_path / "m.gguf", arch, Q.F32)
    ours = load_tokenizer(arch, tmp_path)  # the formatting path: built without torch
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.decode(ours.encode(text)) == text
    assert ours.encode("<|im_end|>") == [2]  # control tokens stay whole
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (0, 2, 0)
    messages = [{"role": "user", "content": "the tin"}, {"role": "assistant", "content": "in a theater"}]
    assert ours.apply_chat_template(messages, tokenize=False) == ref.apply_chat_template(messages, tokenize=False)


def test_tokenizer_errors_name_the_key(tmp_path):
    from cgc_lora_jax.models.gguf_tokenizer import gguf_tokenizer

    write_tiny_gguf(tmp_path / "m.gguf", "llama", Q.F32)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    writer = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    for key, field in reader.fields.items():
        if key.startswith(("llama.", "tokenizer.")) and key != "tokenizer.ggml.model":
            writer.add_key_value(key, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None)
    writer.add_tokenizer_model("llama")
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"spm\.gguf: tokenizer\.ggml\.model='llama'"):
        gguf_tokenizer(tmp_path / "spm.gguf")


def test_a_run_base_can_be_a_gguf_file(tmp_path):
    import ml_collections

    from cgc_lora_jax.run import load_base

    write_tiny_gguf(tmp_path / "m.gguf", "qwen2", Q.Q8_0)
    cfg = ml_collections.ConfigDict(dict(path=str(tmp_path / "m.gguf"), builtin="", dtype="float32", remat=False))
    base = load_base(cfg, lora=None)
    assert base.family == "qwen2" and base.tokenizer.eos_token_id == 2
    before = base.info["fingerprint"]
    data = bytearray((tmp_path / "m.gguf").read_bytes())
    data[-1] ^= 1  # a changed last weight byte changes the fingerprint
    (tmp_path / "m.gguf").write_bytes(bytes(data))
    assert load_base(cfg, lora=None, with_tokenizer=False).info["fingerprint"] != before


def test_merged_task_weights_reuse_the_base_models_generation_program(tmp_path):
    """Answering runs the base row, then each task's merged weights, through one compiled program:
    the loaded base is committed to its device like the kernels computed from it, so the merged
    params do not differ from the base's in placement (jit keys its programs on it)."""
    import jax

    from cgc_lora_jax.layers import CGCLoRAConfig
    from cgc_lora_jax.merge import merge_task
    from cgc_lora_jax.models import generate as gen
    from cgc_lora_jax.params import join_params, split_params

    write_tiny_gguf(tmp_path / "m.gguf", "llama", Q.F32)
    lora = CGCLoRAConfig(num_tasks=2, num_common=1, common_rank=2, specific_rank=2, targets=r"(q_proj|v_proj)$")
    model, params = load_pretrained(tmp_path / "m.gguf", jnp.float32, lora=lora)
    base, adapters = split_params(params)
    adapters = jax.device_put(adapters, jax.devices()[0])  # as a restored checkpoint holds them
    merged = merge_task(join_params(base, adapters), 1, lora)
    plain = model.clone(lora=None)
    ids = np.asarray([[5, 6, 7, 8], [9, 10, 11, 12]], np.int32)
    before = gen._generate._cache_size()
    outs = [np.asarray(generate(plain, p, ids, np.ones_like(ids), None, max_new_tokens=3, eos_token_id=None,
                                pad_token_id=0)) for p in (base, merged)]
    assert gen._generate._cache_size() == before + 1
    np.testing.assert_array_equal(outs[0], outs[1])  # B starts at zero: the merged model is the base
