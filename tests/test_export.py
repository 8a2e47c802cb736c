"""cgc_lora_jax/export.py: PEFT adapters and merged checkpoints against transformers + peft (tiny,
random, float32 Llama and Qwen2), orbax round trip, and ChatGLM's fused module names.

A "run" here is what the trainer leaves in its workdir (config.json, task_vocab.json, adapters/),
written from a base loaded with load_pretrained and adapters and gate randomised so that every
task's outputs differ.
"""

import functools
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from cgc_lora_jax import export
from cgc_lora_jax.cli import export as export_cli
from cgc_lora_jax.run import adapter_shapes, fingerprint_base, load_adapter_set, load_adapters, lora_config, save_adapters
from cgc_lora_jax.config import load_config, to_json
from cgc_lora_jax.merge import merge_task
from cgc_lora_jax.params import join_params
from cgc_lora_jax.data.task_vocab import TaskVocab
from cgc_lora_jax.models.family import FAMILIES
from cgc_lora_jax.models.hf_io import load_pretrained
from cgc_lora_jax.models.weight_reader import locate_tensors, open_weights
from conftest import CHATGLM_FIXTURES as FIXTURES, rel_err

peft = pytest.importorskip("peft")

TOL = 1e-4  # max|ours - torch| / max|torch|, float32
VOCAB = 128
TASKS = ("TaskA", "TaskB", "TaskC")
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
VARIANTS = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}


def random_adapters(model, seed: int) -> dict:
    """Gaussian A, B and gate for `model`'s adapters (B is zero after init, which would make every
    task the base); numpy, since compiling `model.init` costs more than this whole file."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(adapter_shapes(model))
    std = lambda path: 1.0 if "task_gate" in path else 0.15  # noqa: E731
    return traverse_util.unflatten_dict(
        {p: jnp.asarray(std(p) * rng.standard_normal(s.shape), s.dtype) for p, s in flat.items()})


def make_run(workdir: Path, base_path: Path, targets: str, tasks=TASKS) -> dict:
    """The files the trainer writes, with random adapters on the base at base_path."""
    cfg = load_config("promptcblue", [
        f"model.path={base_path}", "model.dtype=float32", "lora.num_common=2", "lora.common_rank=2",
        "lora.specific_rank=2", "lora.alpha=8.0", "lora.task_embed_dim=8", "lora.dropout=0.0",
        f"lora.targets={targets}", f"data.tasks={','.join(tasks)}"])
    lora = lora_config(cfg.lora, len(tasks))
    plain, base = load_pretrained(base_path, jnp.float32)
    model = plain.clone(lora=lora)
    adapters = random_adapters(model, seed=1)
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(to_json(cfg))
    TaskVocab(tasks).save(workdir / "task_vocab.json")
    info = {"path": str(base_path.resolve()), "fingerprint": fingerprint_base(base_path)}
    meta = {"config": cfg.to_dict(), "task_vocab": list(tasks), "family": "test", "base": info, "step": 3}
    save_adapters(workdir / "adapters", jax.device_get(adapters), meta)
    return {"model": model, "params": join_params(base, adapters), "lora": lora}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def tiny_run(request, tmp_path_factory):
    """(torch base folder, run workdir, our model and params) of one family."""
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(
        VARIANTS[request.param](**SIZES, rms_norm_eps=1e-6), attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():  # non-zero biases (Qwen2's q/k/v) and norms
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(root / "base")
    run = make_run(root / "run", root / "base", targets="q_proj|v_proj|o_proj|down_proj")
    ids = np.random.default_rng(0).integers(3, VOCAB, (2, 12))
    return {"root": root, "base": root / "base", "workdir": root / "run", "ids": ids, **run}


@functools.cache
def jitted_apply(model):
    """One compiled forward per module (equal modules share it)."""
    return jax.jit(model.apply)


def our_logits(model, params, ids, task_id=None):
    task_ids = None if task_id is None else jnp.full((ids.shape[0],), task_id, jnp.int32)
    return np.asarray(jitted_apply(model)({"params": params}, jnp.asarray(ids, jnp.int32), None, task_ids))


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits.numpy()


def load_torch(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def test_peft_export_of_every_task_matches_our_adapters(tiny_run):
    out = tiny_run["root"] / "peft"
    assert export_cli.main(["--workdir", str(tiny_run["workdir"]), "--task", "all", "--format", "peft", "--out", str(out)]) == 0
    ours = {t: our_logits(tiny_run["model"], tiny_run["params"], tiny_run["ids"], t) for t in range(len(TASKS))}
    assert rel_err(ours[0], ours[1]) > 1e-2 and rel_err(ours[1], ours[2]) > 1e-2  # tasks really differ
    for task_id, task in enumerate(TASKS):
        config = json.loads((out / task / "adapter_config.json").read_text())
        assert config["r"] == config["lora_alpha"] == tiny_run["lora"].task_rank == 6
        assert config["target_modules"] == ["down_proj", "o_proj", "q_proj", "v_proj"]
        assert config["base_model_name_or_path"] == str(tiny_run["base"].resolve())
        peft_model = peft.PeftModel.from_pretrained(load_torch(tiny_run["base"]), out / task).eval()
        err = rel_err(ours[task_id], torch_logits(peft_model, tiny_run["ids"]))
        assert err <= TOL, f"{task}: PEFT logits rel err {err:.2e}"


def test_peft_export_of_some_layers_names_them_in_full(tiny_run):
    """A target regex that adapts q_proj in layer 0 only: PEFT must not adapt layer 1's q_proj."""
    workdir = tiny_run["root"] / "run_layer0"
    run = make_run(workdir, tiny_run["base"], targets="layers_0/self_attn/q_proj|v_proj")
    (folder,) = export.export(workdir, "TaskA", "peft", tiny_run["root"] / "peft_layer0")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj", "v_proj"]
    peft_model = peft.PeftModel.from_pretrained(load_torch(tiny_run["base"]), folder).eval()
    err = rel_err(our_logits(run["model"], run["params"], tiny_run["ids"], 0), torch_logits(peft_model, tiny_run["ids"]))
    assert err <= TOL, f"PEFT logits rel err {err:.2e}"


def test_merged_hf_export_loads_in_transformers(tiny_run):
    task_id, task = 2, TASKS[2]
    (folder,) = export.export(tiny_run["workdir"], task, "hf", tiny_run["root"] / "hf")
    merged = merge_task(tiny_run["params"], task_id, tiny_run["lora"])
    ours_merged = our_logits(tiny_run["model"].clone(lora=None), merged, tiny_run["ids"])
    err = rel_err(ours_merged, torch_logits(load_torch(folder), tiny_run["ids"]))
    assert err <= TOL, f"merged checkpoint rel err {err:.2e}"
    # and the merged model is the adapter model for that task
    assert rel_err(ours_merged, our_logits(tiny_run["model"], tiny_run["params"], tiny_run["ids"], task_id)) <= TOL


def test_orbax_export_restores_onto_a_fresh_base_exactly(tiny_run):
    (folder,) = export.export(tiny_run["workdir"], "all", "orbax", tiny_run["root"] / "orbax")
    model, params, vocab = export.load_exported_adapters(folder, str(tiny_run["base"]))
    assert vocab == TaskVocab(TASKS)
    stored, meta = load_adapters(folder)  # the adapters and gate only: no base, no optimizer state
    assert set(traverse_util.flatten_dict(stored)) == set(traverse_util.flatten_dict(adapter_shapes(model)))
    assert meta["task_vocab"] == list(TASKS) and meta["lora"]["num_tasks"] == len(TASKS)
    for task_id in range(len(TASKS)):
        np.testing.assert_array_equal(
            our_logits(model, params, tiny_run["ids"], task_id),
            our_logits(tiny_run["model"], tiny_run["params"], tiny_run["ids"], task_id))


@pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"{FIXTURES} is absent (shared ChatGLM fixtures)")
def test_chatglm_exports_use_the_original_names(tmp_path):
    """ChatGLM-6B's fused query_key_value is one HF module: PEFT's W0 + B A is the merged weight,
    and the merged checkpoint has exactly the original checkpoint's tensors."""
    targets = "query_key_value|dense_4h_to_h"
    run = make_run(tmp_path / "run", FIXTURES / "v1", targets=targets)
    adapter_set = load_adapter_set(tmp_path / "run")
    peft_dir = export.export_peft(adapter_set, "TaskB", tmp_path / "peft")
    hf_dir = export.export_hf(adapter_set, "TaskB", tmp_path / "hf")
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["target_modules"] == ["dense_4h_to_h", "query_key_value"]

    original, merged = locate_tensors(FIXTURES / "v1"), locate_tensors(hf_dir)
    ignored = FAMILIES["chatglm"].ignored_keys  # derived buffers: the original code rebuilds them
    assert set(merged) == {k for k in original if not re.search(ignored, k)}
    from safetensors.numpy import load_file

    lora = load_file(peft_dir / "adapter_model.safetensors")
    with open_weights(FIXTURES / "v1" / "pytorch_model.bin") as base, open_weights(hf_dir / "model.safetensors") as out:
        for name in ("transformer.layers.0.attention.query_key_value", "transformer.layers.1.mlp.dense_4h_to_h"):
            w0, w = base.read(f"{name}.weight"), out.read(f"{name}.weight")
            assert w.shape == w0.shape
            a, b = lora[f"base_model.model.{name}.lora_A.weight"], lora[f"base_model.model.{name}.lora_B.weight"]
            assert rel_err(w, w0 + b @ a) <= TOL
            assert rel_err(w - w0, b @ a) <= TOL
    ids = np.random.default_rng(0).integers(10, 1000, (1, 10))
    ids = np.concatenate([ids, [[1001, 1004]]], axis=1)  # text + [gMASK, <sop>]
    model, params = load_pretrained(hf_dir, jnp.float32)
    want = our_logits(run["model"], run["params"], ids, 1)
    assert rel_err(our_logits(model, params, ids), want) <= TOL
