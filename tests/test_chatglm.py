"""models/chatglm.py against the original ChatGLM-6B (PyTorch) reference fixtures, float32.

Relative error = max|ours - reference| / max|reference|; parity bound 1e-4, never loosened.
"""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from conftest import CHATGLM_FIXTURES as FIXTURES, rel_err

if not (FIXTURES / "v1" / "reference.npz").is_file():
    pytest.skip(f"{FIXTURES}/v1 is absent (the shared ChatGLM fixtures)", allow_module_level=True)

import torch  # noqa: E402  (only needed to read the reference checkpoint)

from cgc_lora_jax.layers import CGCLoRAConfig  # noqa: E402
from cgc_lora_jax.params import join_params, split_params  # noqa: E402
from cgc_lora_jax.sharding import make_mesh, match_partition_rules, named_shardings  # noqa: E402
from cgc_lora_jax.models.chatglm import FAMILY, ChatGLMConfig, glm_layout, rotary_inv_freq  # noqa: E402

PARITY = 1e-4
V1 = FIXTURES / "v1"
LORA = CGCLoRAConfig(
    num_tasks=3, num_common=2, common_rank=2, specific_rank=2, task_embed_dim=8,
    targets="query_key_value|dense",
)
TASKS = np.array([0, 2, 1], np.int32)


def causal_lm_loss(logits, labels):
    """Mean cross entropy of logits[:, :-1] against labels[:, 1:] over labels != -100."""
    logits, labels = jnp.asarray(logits)[:, :-1], jnp.asarray(labels)[:, 1:]
    valid = labels != -100
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * valid) / jnp.sum(valid)


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(V1 / "reference.npz"))


@pytest.fixture(scope="module")
def cfg():
    return ChatGLMConfig.from_hf(json.loads((V1 / "config.json").read_text()))


@pytest.fixture(scope="module")
def state_dict():
    return {k: v.numpy() for k, v in torch.load(V1 / "pytorch_model.bin", map_location="cpu", weights_only=True).items()}


@pytest.fixture(scope="module")
def params(cfg, state_dict):
    flat = {}
    for hf_key, (path, transpose) in FAMILY.key_map(cfg).items():
        tensor = state_dict[hf_key]
        flat[path] = jnp.asarray(tensor.T if transpose else tensor)
    return traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module")
def forward(cfg):
    """jit(params, input_ids, attention_mask, task_ids) -> logits for a model variant."""
    def make(**kw):
        model = FAMILY.build(cfg, **kw)
        return jax.jit(lambda p, ids, mask=None, tasks=None: model.apply({"params": p}, ids, mask, tasks))
    return make


@pytest.fixture(scope="module")
def lora_params(cfg, params):
    """The adapted model's tree: loaded base, zero B (as initialised), random A and gate."""
    model = FAMILY.build(cfg, lora=LORA)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((3, 4), jnp.int32), None, jnp.asarray(TASKS))
    rng = np.random.default_rng(0)
    flat = {
        path: jnp.zeros(leaf.shape) if path[-1] == "B" else jnp.asarray(rng.normal(0.0, 0.3, leaf.shape), jnp.float32)
        for path, leaf in traverse_util.flatten_dict(shapes["params"]).items()
    }
    flat.update(traverse_util.flatten_dict(params))
    return traverse_util.unflatten_dict(flat)


def randomized_adapters(tree, seed=0):
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(tree)
    for path, leaf in flat.items():
        if "lora" in path or "task_gate" in path:
            flat[path] = jnp.asarray(rng.normal(0.0, 0.3, leaf.shape), leaf.dtype)
    return traverse_util.unflatten_dict(flat)


def test_config_from_hf():
    hf = json.loads((V1 / "config.json").read_text())
    cfg = ChatGLMConfig.from_hf(hf)
    assert (cfg.hidden_size, cfg.num_layers, cfg.inner_hidden_size, cfg.gmask_token_id) == (64, 2, 256, 1001)
    assert cfg.hf_config == hf
    broken = {k: v for k, v in hf.items() if k != "inner_hidden_size"}
    with pytest.raises(ValueError, match=r"config\.json.*inner_hidden_size"):
        ChatGLMConfig.from_hf(broken)
    assert FAMILY.matches(hf)
    assert not FAMILY.matches(json.loads((FIXTURES / "v2" / "config.json").read_text()))


def test_key_map_covers_checkpoint_and_model(cfg, state_dict, params):
    ignored = re.compile(FAMILY.ignored_keys)
    key_map = FAMILY.key_map(cfg)
    assert set(key_map) == {k for k in state_dict if not ignored.search(k)}
    assert {k for k in state_dict if ignored.search(k)} == {
        f"transformer.layers.{i}.attention.rotary_emb.inv_freq" for i in range(2)
    }
    assert key_map["lm_head.weight"] == key_map["transformer.word_embeddings.weight"]  # tied
    model = FAMILY.build(cfg)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    shapes = {path: leaf.shape for path, leaf in traverse_util.flatten_dict(shapes).items()}
    loaded = {path: leaf.shape for path, leaf in traverse_util.flatten_dict(params).items()}
    assert loaded == shapes
    assert ("transformer", "layers_0", "attention", "query_key_value", "kernel") in shapes
    # What the ignored tensors hold is what the model derives: float16-rounded inv_freq, tied head.
    for i in range(cfg.num_layers):
        np.testing.assert_array_equal(
            state_dict[f"transformer.layers.{i}.attention.rotary_emb.inv_freq"], rotary_inv_freq(cfg.head_dim)
        )
    np.testing.assert_array_equal(state_dict["lm_head.weight"], state_dict["transformer.word_embeddings.weight"])


@pytest.mark.parametrize("case", ["single", "batch"])
def test_derived_layout_equals_reference(cfg, ref, case):
    mask = None if case == "single" else jnp.asarray(ref["batch_valid_mask"])
    layout = jax.jit(glm_layout, static_argnums=2)(jnp.asarray(ref[f"{case}_input_ids"]), mask, cfg)
    np.testing.assert_array_equal(np.asarray(layout.position_ids), ref[f"{case}_position_ids"])
    np.testing.assert_array_equal(~np.asarray(layout.visible), ref[f"{case}_attention_mask"])


def test_single_and_batch_logits(ref, params, forward):
    apply = forward()
    single = apply(params, jnp.asarray(ref["single_input_ids"]))
    assert single.dtype == jnp.float32
    err = rel_err(single, ref["single_logits"])
    assert err <= PARITY, f"single logits rel err {err:.2e}"
    batch = np.asarray(apply(params, jnp.asarray(ref["batch_input_ids"]), jnp.asarray(ref["batch_valid_mask"])))
    valid = ref["batch_valid_mask"].astype(bool)
    err = rel_err(batch[valid], ref["batch_logits"][valid])
    assert err <= PARITY, f"batch logits rel err {err:.2e}"


def test_train_logits_and_loss(ref, params, forward):
    apply = forward()
    logits = apply(params, jnp.asarray(ref["train_input_ids"]))
    err = rel_err(logits, ref["train_logits"])
    assert err <= PARITY, f"train logits rel err {err:.2e}"
    err = rel_err(causal_lm_loss(logits, ref["train_labels"]), ref["train_loss"])
    assert err <= PARITY, f"train loss rel err {err:.2e}"
    for i, n in enumerate(ref["train_valid_mask"].sum(1)):  # each example alone, unpadded
        ids, labels = ref["train_input_ids"][i : i + 1, :n], ref["train_labels"][i : i + 1, :n]
        loss = causal_lm_loss(apply(params, jnp.asarray(ids)), labels)
        err = rel_err(loss, ref["train_loss_per_example"][i])
        assert err <= PARITY, f"example {i} loss rel err {err:.2e}"


def test_greedy_decode_with_kv_cache(cfg, ref, params):
    model = FAMILY.build(cfg)
    ids, mask = jnp.asarray(ref["batch_input_ids"]), jnp.asarray(ref["batch_valid_mask"])
    steps = ref["gen_new_ids"].shape[1]
    cache = model.init_cache(ids.shape[0], ids.shape[1] + steps)
    decode = jax.jit(lambda p, i, m, c: model.apply({"params": p}, i, m, cache=c, method=model.decode))
    logits, cache = decode(params, ids, mask, cache)
    scores = [logits[:, -1]]
    for _ in range(steps - 1):
        token = jnp.argmax(scores[-1], axis=-1)[:, None]
        logits, cache = decode(params, token, jnp.ones_like(token), cache)
        scores.append(logits[:, -1])
    scores = np.stack([np.asarray(s) for s in scores])
    for step in range(steps):
        err = rel_err(scores[step], ref["gen_scores"][step])
        assert err <= PARITY, f"decode step {step} rel err {err:.2e}"
    np.testing.assert_array_equal(scores.argmax(-1).T, ref["gen_new_ids"])
    assert decode._cache_size() == 2  # one prompt shape, one step shape: no recompiles per step
    assert int(cache["index"]) == ids.shape[1] + steps - 1
    np.testing.assert_array_equal(np.asarray(cache["mask_position"]), ref["batch_position_ids"][:, 0, -1])
    np.testing.assert_array_equal(np.asarray(cache["block_position"]), np.full(3, steps))


def test_adapter_tree_and_zero_b_is_base(cfg, ref, params, lora_params):
    flat = traverse_util.flatten_dict(lora_params)
    base = set(traverse_util.flatten_dict(params))
    adapters = {p for p in flat if "lora" in p or "task_gate" in p}
    assert set(flat) - adapters == base
    expected = {("task_gate", name) for name in ("task_embedding", "common", "specific")}
    for i in range(2):
        for layer in ("attention/query_key_value", "attention/dense", "mlp/dense_h_to_4h", "mlp/dense_4h_to_h"):
            path = ("transformer", f"layers_{i}", *layer.split("/"))
            expected |= {path + ("lora", "A"), path + ("lora", "B")}
            assert path + ("kernel",) in base
    assert adapters == expected
    # Op by op (no jit), so XLA fusion cannot reorder the base path's float arithmetic.
    ids = jnp.asarray(ref["single_input_ids"])
    base_logits = FAMILY.build(cfg).apply({"params": params}, ids)
    adapted = FAMILY.build(cfg, lora=LORA).apply({"params": lora_params}, ids, None, jnp.asarray([2]))
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(base_logits))


def test_mixed_task_batch_equals_per_task_rows(ref, params, lora_params, forward):
    tree = randomized_adapters(lora_params)
    apply = forward(lora=LORA)
    ids, mask = jnp.asarray(ref["batch_input_ids"]), jnp.asarray(ref["batch_valid_mask"])
    mixed = np.asarray(apply(tree, ids, mask, jnp.asarray(TASKS)))
    valid = ref["batch_valid_mask"].astype(bool)
    base = np.asarray(forward()(params, ids, mask))
    assert rel_err(mixed[valid], base[valid]) > 1e-2  # the adapters change the output
    for row, task in enumerate(TASKS):
        alone = np.asarray(apply(tree, ids[row : row + 1], mask[row : row + 1], jnp.asarray([task])))
        assert rel_err(mixed[row][valid[row]], alone[0][valid[row]]) <= 1e-5
        other = np.asarray(apply(tree, ids[row : row + 1], mask[row : row + 1], jnp.asarray([(task + 1) % 3])))
        assert rel_err(other[0][valid[row]], alone[0][valid[row]]) > 1e-3  # tasks are routed apart


def test_remat_gives_same_logits_and_adapter_gradients(cfg, ref, lora_params):
    base, adapters = split_params(randomized_adapters(lora_params, seed=1))
    ids, labels, tasks = jnp.asarray(ref["train_input_ids"]), ref["train_labels"], jnp.asarray(TASKS)
    results = []
    for remat in (False, True):
        model = FAMILY.build(cfg, lora=LORA, remat=remat)

        def loss(trainable):
            logits = model.apply({"params": join_params(base, trainable)}, ids, None, tasks)
            return causal_lm_loss(logits, labels), logits

        (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(adapters)
        results.append((value, logits, traverse_util.flatten_dict(grads)))
    (v0, l0, g0), (v1, l1, g1) = results
    # Rematerialisation changes XLA's fusion, so float32 rounding differs slightly.
    assert rel_err(l1, l0) <= 1e-5 and rel_err(v1, v0) <= 1e-5
    assert set(g0) == set(traverse_util.flatten_dict(adapters))
    assert float(jnp.max(jnp.abs(g0[("transformer", "layers_0", "attention", "query_key_value", "lora", "A")]))) > 0
    for path in g0:
        assert rel_err(g1[path], g0[path]) <= 1e-4, "/".join(path)


def test_bf16_parameters_stay_close(cfg, ref, params, forward):
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    logits = forward(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)(bf16, jnp.asarray(ref["single_input_ids"]))
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    # Rounding the weights to bf16 alone moves these logits by ~4% (bf16 keeps 8 significant bits).
    assert rel_err(logits, ref["single_logits"]) <= 0.1
    assert np.mean(np.asarray(logits).argmax(-1) == ref["single_logits"].argmax(-1)) >= 0.9


def test_partition_rules_and_sharded_forward(cfg, ref, lora_params, forward):
    specs = traverse_util.flatten_dict(match_partition_rules(FAMILY.partition_rules, lora_params), sep="/")
    layer = "transformer/layers_0/"
    assert specs["transformer/word_embeddings/embedding"] == P("tensor", "fsdp")
    assert specs[layer + "attention/query_key_value/kernel"] == P("fsdp", "tensor")
    assert specs[layer + "mlp/dense_h_to_4h/bias"] == P("tensor")
    assert specs[layer + "attention/dense/kernel"] == P("tensor", "fsdp")
    assert specs[layer + "mlp/dense_4h_to_h/kernel"] == P("tensor", "fsdp")
    assert specs[layer + "input_layernorm/scale"] == P()
    assert specs[layer + "attention/query_key_value/lora/A"] == P()
    assert specs["task_gate/task_embedding"] == P()
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    tree = randomized_adapters(lora_params, seed=2)
    sharded = jax.device_put(tree, named_shardings(mesh, match_partition_rules(FAMILY.partition_rules, tree)))
    ids, mask, tasks = (jnp.asarray(ref["batch_input_ids"]), jnp.asarray(ref["batch_valid_mask"]), jnp.asarray(TASKS))
    apply = forward(lora=LORA)
    # Sharded matmuls reduce in another order: float32 rounding only.
    assert rel_err(apply(sharded, ids, mask, tasks), apply(tree, ids, mask, tasks)) <= PARITY
