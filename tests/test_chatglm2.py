"""models/chatglm2.py against the original ChatGLM2-6B / ChatGLM3-6B PyTorch code (fixtures).

Relative error = max|a - b| / max|b|; float32 parity bound 1e-4, never loosened.
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

from cgc_lora_jax.layers import CGCLoRAConfig
from cgc_lora_jax.sharding import make_mesh, match_partition_rules, named_shardings
from cgc_lora_jax.models import chatglm2
from cgc_lora_jax.models.chatglm2 import ChatGLM2Config, ChatGLM2ForCausalLM
from cgc_lora_jax.models.family import detect_family

from conftest import CHATGLM_FIXTURES as FIXTURES, rel_err

if not FIXTURES.is_dir():
    pytest.skip(f"{FIXTURES} is absent (shared ChatGLM fixtures)", allow_module_level=True)

TOL = 1e-4
VERSIONS = ("v2", "v3")
LORA = CGCLoRAConfig(
    num_tasks=3, num_common=2, common_rank=2, specific_rank=2, targets="query_key_value|dense"
)


def read_checkpoint(version: str) -> dict[str, np.ndarray]:
    """The stored tensors, as the test's own minimal reader (the streaming loader is hf_io.py)."""
    root = FIXTURES / version
    if (root / "model.safetensors").exists():
        from safetensors.numpy import load_file

        return dict(load_file(root / "model.safetensors"))
    import torch

    index = json.loads((root / "pytorch_model.bin.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        for name, t in torch.load(root / shard, map_location="cpu", weights_only=True).items():
            tensors[name] = t.numpy()
    assert set(tensors) == set(index["weight_map"])
    return tensors


def to_flax(tensors: dict, config: ChatGLM2Config) -> dict:
    flat = {}
    for name, (path, transpose) in chatglm2.key_map(config).items():
        flat[path] = tensors[name].T if transpose else tensors[name]
    return traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module", params=VERSIONS)
def case(request):
    root = FIXTURES / request.param
    hf = json.loads((root / "config.json").read_text())
    config = chatglm2.FAMILY.config_from_hf(hf)
    ref = dict(np.load(root / "reference.npz"))
    params = to_flax(read_checkpoint(request.param), config)
    return dict(version=request.param, hf=hf, config=config, params=params, ref=ref)


@pytest.fixture(scope="module")
def model(case):
    return chatglm2.FAMILY.build(
        case["config"], dtype=jnp.float32, param_dtype=jnp.float32, lora=None, remat=False
    )


@pytest.fixture(scope="module")
def forward(model):
    return jax.jit(lambda params, ids, mask: model.apply({"params": params}, ids, mask))


def test_config_and_family(case):
    hf, config = case["hf"], case["config"]
    assert chatglm2.FAMILY.matches(hf) and detect_family(hf) is chatglm2.FAMILY
    assert not chatglm2.FAMILY.matches(json.loads((FIXTURES / "v1" / "config.json").read_text()))
    sizes = (config.multi_query_group_num, config.kv_channels, config.padded_vocab_size)
    assert sizes == (2, 16, 1024)
    assert config.hf_config == hf and config.eos_token_id == 2 and config.pad_token_id == 0
    broken = {k: v for k, v in hf.items() if k != "kv_channels"}
    with pytest.raises(ValueError, match=r"config\.json.*kv_channels"):
        ChatGLM2Config.from_hf(broken)
    with pytest.raises(ValueError, match=r"config\.json: rmsnorm=False"):
        ChatGLM2Config.from_hf({**hf, "rmsnorm": False})
    with pytest.raises(ValueError, match=r"multi_query_attention=False"):
        ChatGLM2Config.from_hf({**hf, "multi_query_attention": False})


def test_key_map_covers_checkpoint_and_params(case, model):
    tensors = read_checkpoint(case["version"])
    keys = chatglm2.key_map(case["config"])
    ignored = chatglm2.FAMILY.ignored_keys
    stored = {k for k in tensors if not re.search(ignored, k)}
    assert stored == set(keys), f"unmapped: {stored - set(keys)}, absent: {set(keys) - stored}"
    assert [k for k in tensors if re.search(ignored, k)] == ["transformer.rotary_pos_emb.inv_freq"]
    shapes = traverse_util.flatten_dict(
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    )
    assert set(shapes) == {path for path, _ in keys.values()}
    for name, (path, transpose) in keys.items():
        want = tensors[name].T.shape if transpose else tensors[name].shape
        got = shapes[path].shape
        assert got == want, f"{name} -> {'/'.join(path)}: {got} != {want}"


def test_single_logits(case, forward):
    ref = case["ref"]
    logits = forward(case["params"], jnp.asarray(ref["single_input_ids"]), None)
    err = rel_err(logits, ref["single_logits"])
    print(f"{case['version']} single_logits rel err {err:.2e}")
    assert err <= TOL


def test_batch_logits_and_positions(case, forward):
    ref = case["ref"]
    mask = jnp.asarray(ref["batch_attention_mask"])
    np.testing.assert_array_equal(chatglm2.left_pad_positions(mask), ref["batch_position_ids"])
    logits = forward(case["params"], jnp.asarray(ref["batch_input_ids"]), mask)
    valid = ref["batch_valid_mask"].astype(bool)
    err = rel_err(np.asarray(logits)[valid], ref["batch_logits"][valid])
    print(f"{case['version']} batch_logits rel err {err:.2e}")
    assert err <= TOL


def masked_ce(logits, labels):
    """Per-example sums and counts of CE(logits[:, :-1], labels[:, 1:]) over labels != -100."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != -100
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(keep, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * keep, axis=1), jnp.sum(keep, axis=1)


def test_train_logits_and_loss(case, forward):
    ref = case["ref"]
    logits = forward(case["params"], jnp.asarray(ref["train_input_ids"]), None)
    err = rel_err(logits, ref["train_logits"])
    sums, counts = masked_ce(logits, jnp.asarray(ref["train_labels"]))
    loss_err = rel_err(jnp.sum(sums) / jnp.sum(counts), ref["train_loss"])
    per_example_err = rel_err(sums / counts, ref["train_loss_per_example"])
    print(f"{case['version']} train {err:.2e} loss {loss_err:.2e} each {per_example_err:.2e}")
    assert err <= TOL and loss_err <= TOL and per_example_err <= TOL


def test_greedy_decode_with_cache(case, model):
    ref = case["ref"]
    ids = jnp.asarray(ref["batch_input_ids"], jnp.int32)
    mask = jnp.asarray(ref["batch_attention_mask"])
    steps = ref["gen_new_ids"].shape[1]
    cache = model.init_cache(ids.shape[0], ids.shape[1] + steps)

    @jax.jit
    def generate(params, cache):
        step = lambda tokens, masks, cache: model.apply(  # noqa: E731
            {"params": params}, tokens, masks, cache=cache, method=model.decode
        )
        logits, cache = step(ids, mask, cache)
        scores = logits[:, -1]

        def body(carry, _):
            scores, cache = carry
            token = jnp.argmax(scores, axis=-1).astype(jnp.int32)
            logits, cache = step(token[:, None], jnp.ones((ids.shape[0], 1), jnp.int32), cache)
            return (logits[:, -1], cache), (scores, token)

        _, (all_scores, tokens) = jax.lax.scan(body, (scores, cache), None, length=steps)
        return all_scores, tokens.T

    scores, new_ids = generate(case["params"], cache)
    err = rel_err(scores, ref["gen_scores"])
    print(f"{case['version']} gen_scores rel err {err:.2e}")
    assert err <= TOL
    np.testing.assert_array_equal(new_ids, ref["gen_new_ids"])


@pytest.fixture(scope="module")
def lora_model(case):
    """An adapter model, its params with B = 0 and with random B; base = fixture weights.

    Adapters are drawn with numpy in the init's shapes (jax's init would compile every random
    initializer of the 6B-shaped tree for no gain here).
    """
    model = ChatGLM2ForCausalLM(case["config"], lora=LORA)
    dummy = jnp.zeros((3, 4), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), dummy, task_ids=jnp.arange(3))
    base = traverse_util.flatten_dict(case["params"])
    rng = np.random.default_rng(0)
    zero_b, random_b = {}, {}
    for path, leaf in traverse_util.flatten_dict(shapes["params"]).items():
        if path in base:
            zero_b[path] = random_b[path] = base[path]
        elif path[-1] == "B":
            zero_b[path] = np.zeros(leaf.shape, np.float32)
            random_b[path] = rng.normal(0.0, 0.05, leaf.shape).astype(np.float32)
        else:  # A and the task gate
            zero_b[path] = random_b[path] = rng.normal(0.0, 0.5, leaf.shape).astype(np.float32)
    return model, traverse_util.unflatten_dict(zero_b), traverse_util.unflatten_dict(random_b)


def test_lora_zero_b_is_base_and_tasks_mix(case, forward, lora_model):
    ref = case["ref"]
    model, zero_b, random_b = lora_model
    adapted = {"/".join(p[:-2]) for p in traverse_util.flatten_dict(zero_b) if p[-1] == "B"}
    names = {p.rsplit("/", 1)[-1] for p in adapted}
    assert names == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    assert len(adapted) == 4 * case["config"].num_layers
    ids, mask = jnp.asarray(ref["batch_input_ids"]), jnp.asarray(ref["batch_attention_mask"])
    apply = jax.jit(lambda p, tasks: model.apply({"params": p}, ids, mask, tasks))
    base = forward(case["params"], ids, mask)
    np.testing.assert_array_equal(apply(zero_b, jnp.array([0, 1, 2])), base)

    # Nonzero B: each row of a mixed-task batch equals the same row run with its task alone.
    mixed = np.asarray(apply(random_b, jnp.array([2, 0, 1])))
    valid = ref["batch_valid_mask"].astype(bool)
    per_task = [np.asarray(apply(random_b, jnp.full((3,), t))) for t in range(3)]
    for row, task in enumerate([2, 0, 1]):
        assert rel_err(mixed[row][valid[row]], per_task[task][row][valid[row]]) <= 1e-6
    assert rel_err(per_task[0][valid], per_task[1][valid]) > 1e-3  # tasks really differ


def test_remat_same_logits(case, forward):
    ref = case["ref"]
    model = ChatGLM2ForCausalLM(case["config"], remat=True)
    ids, mask = jnp.asarray(ref["batch_input_ids"]), jnp.asarray(ref["batch_attention_mask"])
    logits = jax.jit(lambda p: model.apply({"params": p}, ids, mask))(case["params"])
    assert rel_err(logits, forward(case["params"], ids, mask)) <= 1e-6


@pytest.mark.parametrize("case", ["v2"], indirect=True)  # v3 is the same network: check once
def test_remat_same_adapter_grads(case, lora_model):
    """remat=True: same loss and same adapter gradients (the base is frozen in training)."""
    ref = case["ref"]
    ids, labels = jnp.asarray(ref["train_input_ids"]), jnp.asarray(ref["train_labels"])
    adapters, base = split_adapters(lora_model[2])
    results = []
    for remat in (False, True):
        model = ChatGLM2ForCausalLM(case["config"], lora=LORA, remat=remat)

        def loss(adapters, base):
            p = {**adapters, "transformer": merge(base["transformer"], adapters["transformer"])}
            logits = model.apply({"params": p}, ids, None, jnp.array([0, 1, 2]))
            sums, counts = masked_ce(logits, labels)
            return jnp.sum(sums) / jnp.sum(counts)

        results.append(jax.jit(jax.value_and_grad(loss))(adapters, base))
    (l0, g0), (l1, g1) = results
    assert rel_err(l1, l0) <= 1e-6
    flat0, flat1 = traverse_util.flatten_dict(g0), traverse_util.flatten_dict(g1)
    assert flat0.keys() == flat1.keys() and any(p[-1] == "A" for p in flat0)
    for path in flat0:
        assert rel_err(flat1[path], flat0[path]) <= 1e-5, path


def split_adapters(params):
    """(adapter leaves: task_gate and every .../lora/..., the frozen rest)."""
    flat = traverse_util.flatten_dict(params)
    is_adapter = lambda p: p[0] == "task_gate" or "lora" in p  # noqa: E731
    return (
        traverse_util.unflatten_dict({p: v for p, v in flat.items() if is_adapter(p)}),
        traverse_util.unflatten_dict({p: v for p, v in flat.items() if not is_adapter(p)}),
    )


def merge(a, b):
    flat = {**traverse_util.flatten_dict(a), **traverse_util.flatten_dict(b)}
    return traverse_util.unflatten_dict(flat)


def test_partition_rules(case):
    model = ChatGLM2ForCausalLM(case["config"], lora=LORA)
    dummy = jnp.zeros((1, 4), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), dummy, task_ids=jnp.zeros(1, jnp.int32))
    specs = match_partition_rules(chatglm2.FAMILY.partition_rules, params["params"])
    specs = traverse_util.flatten_dict(specs, sep="/")
    layer = "transformer/encoder/layers_0/"
    assert specs["transformer/embedding/word_embeddings/embedding"] == P("tensor", "fsdp")
    assert specs[layer + "self_attention/query_key_value/kernel"] == P("fsdp", "tensor")
    assert specs[layer + "self_attention/query_key_value/bias"] == P("tensor")
    assert specs[layer + "self_attention/dense/kernel"] == P("tensor", "fsdp")
    assert specs[layer + "mlp/dense_h_to_4h/kernel"] == P("fsdp", "tensor")
    assert specs[layer + "mlp/dense_4h_to_h/kernel"] == P("tensor", "fsdp")
    assert specs[layer + "input_layernorm/scale"] == P()
    assert specs["transformer/output_layer/kernel"] == P("fsdp", "tensor")
    assert specs[layer + "self_attention/query_key_value/lora/A"] == P()
    assert all(spec == P() for path, spec in specs.items() if path.startswith("task_gate/"))


@pytest.mark.parametrize("case", ["v2"], indirect=True)
def test_sharded_forward_equals_single_device(case, forward):
    """The partition rules are usable as they are: fsdp=2 x tensor=4 gives the same logits."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh = make_mesh({"fsdp": 2, "tensor": 4})
    specs = match_partition_rules(chatglm2.FAMILY.partition_rules, case["params"])
    params = jax.device_put(case["params"], named_shardings(mesh, specs))
    layer = params["transformer"]["encoder"]["layers_0"]
    kernel = layer["self_attention"]["query_key_value"]["kernel"]
    assert len(kernel.sharding.device_set) == 8
    ref = case["ref"]
    ids, mask = jnp.asarray(ref["batch_input_ids"]), jnp.asarray(ref["batch_attention_mask"])
    valid = ref["batch_valid_mask"].astype(bool)
    sharded = np.asarray(forward(params, ids, mask))[valid]
    assert rel_err(sharded, np.asarray(forward(case["params"], ids, mask))[valid]) <= 1e-5
