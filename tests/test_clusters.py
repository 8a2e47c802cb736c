"""cgc_lora_jax/multitask/clusters.py and server.py: the cluster mapping, one trained module set
per cluster over the built-in tiny base, and the server that routes tasks to clusters without
reloading the base."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util

from cgc_lora_jax.cli import clusters as clusters_cli
from cgc_lora_jax.multitask.clusters import format_clusters, parse_clusters
from cgc_lora_jax.multitask.server import MultiTaskServer, jitted_apply
from cgc_lora_jax.run import base as run_base
from cgc_lora_jax.run import load_adapters, save_adapters
from cgc_lora_jax.layers import CGCLoRAConfig
from cgc_lora_jax.params import join_params, split_params
from cgc_lora_jax.models.generate import generate

CLUSTERS = {"colour": ("ColourExtraction",), "rest": ("DigitsToChinese", "CategoryClassification")}
TINY = ["train.batch_size=8", "train.steps=2", "train.log_every=1", "train.eval_every=0",
        "train.checkpoint_every=2", "train.warmup_steps=1", "data.pad_multiple=128", "mesh.data=1"]  # one batch shape: one compile


def test_parse_and_format_clusters():
    text = "colour:ColourExtraction; rest: DigitsToChinese ,CategoryClassification"
    assert parse_clusters(text) == CLUSTERS
    assert parse_clusters(format_clusters(CLUSTERS)) == CLUSTERS
    for bad, why in [("a:X;b:X", "clusters 'a' and 'b'"), ("a:X;a:Y", "defined twice"), ("a", "NAME:TaskA"),
                     ("a/b:X", "names a folder"), ("", "no cluster")]:
        with pytest.raises(ValueError, match=why):
            parse_clusters(bad)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("one_plus_n")
    assert clusters_cli.main(["train", "--config", "demo_tiny", "--clusters", format_clusters(CLUSTERS),
                              "--workdir", str(workdir), *(f"--config.{o}" for o in TINY)]) == 0
    return workdir


def test_each_cluster_trains_its_own_module_set(trained):
    assert json.loads((trained / "clusters.json").read_text())["clusters"] == {k: list(v) for k, v in CLUSTERS.items()}
    for name, tasks in CLUSTERS.items():
        meta = json.loads((trained / name / "adapters" / "meta.json").read_text())
        assert meta["task_vocab"] == list(tasks) and meta["step"] == 2
        assert meta["config"]["data"]["tasks"] == list(tasks)
        logged = {k for line in (trained / name / "metrics.jsonl").read_text().splitlines()
                  for k in json.loads(line) if k.startswith("loss/")}
        assert logged == {f"loss/{t}" for t in tasks}  # each run saw only its cluster's tasks
    assert {m["base"]["fingerprint"] for m in (json.loads((trained / n / "adapters/meta.json").read_text())
                                               for n in CLUSTERS)} .__len__() == 1  # one base for all


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory) -> Path:
    """The trained clusters with their adapters replaced by strong random ones (a few steps leave
    B near zero, where every task answers alike), in the same folder layout."""
    workdir = tmp_path_factory.mktemp("served")
    (workdir / "clusters.json").write_text((trained / "clusters.json").read_text())
    rng = np.random.default_rng(0)
    for name in CLUSTERS:
        adapters, meta = load_adapters(trained / name / "adapters")
        flat = traverse_util.flatten_dict(adapters)
        flat = {p: (1.0 if "task_gate" in p else 0.3) * rng.standard_normal(v.shape).astype(v.dtype)
                for p, v in flat.items()}
        save_adapters(workdir / name / "adapters", traverse_util.unflatten_dict(flat), meta)
    return workdir


def test_server_routes_tasks_and_never_reloads_the_base(served, monkeypatch):
    loads = []
    original = run_base.load_base
    monkeypatch.setattr(run_base, "load_base", lambda *a, **k: loads.append(1) or original(*a, **k))
    server = MultiTaskServer.from_workdir(served)
    assert len(loads) == 1
    assert server.route("ColourExtraction") == ("colour", 0)
    assert server.route("CategoryClassification") == ("rest", 1)
    with pytest.raises(KeyError, match="served tasks"):
        server.route("NoSuchTask")

    # the clusters' params hold the very base arrays of the server, not copies
    base_leaves = jax.tree.leaves(server.base.params)
    for adapter_set in server.clusters.values():
        frozen, adapters = split_params(adapter_set.params)
        assert all(a is b for a, b in zip(jax.tree.leaves(frozen), base_leaves))
        assert jax.tree.leaves(adapters)

    prompts = ["把数字写成汉字：305\n答：", "找出句子里的颜色：小明买了红色的帽子\n答："]
    tasks = {"DigitsToChinese": ("rest", 0), "ColourExtraction": ("colour", 0), "CategoryClassification": ("rest", 1)}
    answers = {task: server.generate(task, prompts, max_new_tokens=6) for task in tasks}
    assert len(loads) == 1  # switching clusters reloaded nothing
    assert len({tuple(a) for a in answers.values()}) == 3, answers  # every task answers differently

    # each answer is what that cluster's adapters, restored on their own from its folder, generate
    # for that task ID
    tok = server.base.tokenizer
    ids = [tok.encode(p, add_special_tokens=False) + [tok.gmask_token_id, tok.sop_token_id] for p in prompts]
    width = max(map(len, ids))
    input_ids = np.array([[tok.pad_token_id] * (width - len(r)) + r for r in ids], np.int32)
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in ids], np.int32)
    for task, (cluster, task_id) in tasks.items():
        adapters, meta = load_adapters(served / cluster / "adapters")
        model = server.base.model.clone(lora=CGCLoRAConfig(len(meta["task_vocab"]), **meta["config"]["lora"]))
        params = join_params(server.base.params, adapters)
        task_ids = np.full(2, task_id, np.int32)
        new = np.asarray(generate(model, params, input_ids, mask, task_ids, max_new_tokens=6,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        want = [tok.decode(row[: next((k for k, t in enumerate(row) if t == tok.eos_token_id), 6)]).strip()
                for row in new.tolist()]
        assert answers[task] == want, task
        if cluster == "rest":
            np.testing.assert_array_equal(server.logits(task, input_ids, mask),
                                          jitted_apply(model)({"params": params}, input_ids, mask, task_ids))
