"""cgc_lora_jax.serve over HTTP on a tiny trained run: answers equal eval.py's and one-at-a-time
generation's, streaming, every bad input, disconnects, the queue limit, the openai client, and
the decode slots against models.generate on a tiny Llama."""

import asyncio
import dataclasses
import json
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from flax import traverse_util

from cgc_lora_jax.cli import eval as eval_cli
from cgc_lora_jax.config import load_config
from cgc_lora_jax.layers import CGCLoRAConfig
from cgc_lora_jax.models.generate import generate
from cgc_lora_jax.params import split_params
from cgc_lora_jax.run import load_adapters, save_adapters
from cgc_lora_jax.serve.app import BackgroundServer, create_app
from cgc_lora_jax.serve.engine import BASE_MODEL_ID, Engine, EngineConfig
from cgc_lora_jax.serve.generation import Finished, Generation, SamplingParams, TextDelta
from cgc_lora_jax.serve.slots import Sampling, SlotGroup
from cgc_lora_jax.training.loop import train

TASKS = ("CategoryClassification", "ColourExtraction", "DigitsToChinese")
NEW = 8  # the run's eval.max_new_tokens
TINY_RUN = ["train.batch_size=8", "train.steps=2", "train.log_every=1", "train.eval_every=0",
            "train.checkpoint_every=2", "train.warmup_steps=1", "data.pad_multiple=128", "mesh.data=1",
            "data.max_eval_per_task=8", f"eval.max_new_tokens={NEW}"]
CONFIG = EngineConfig(slots=8, context=64, prefill_batch=4, max_queue=256, min_bucket=32)  # 2 prefill buckets


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-step demo run whose adapters are then redrawn large (seeded), so every task answers
    differently (two steps leave B near zero, where all tasks answer alike)."""
    workdir = tmp_path_factory.mktemp("runs") / "demo_run"
    train(load_config("demo_tiny", TINY_RUN), workdir)
    adapters, meta = load_adapters(workdir / "adapters")
    rng = np.random.default_rng(0)
    flat = {p: (1.0 if "task_gate" in p else 0.3) * rng.standard_normal(v.shape).astype(v.dtype)
            for p, v in traverse_util.flatten_dict(adapters).items()}
    save_adapters(workdir / "adapters", traverse_util.unflatten_dict(flat), meta)
    return workdir


@pytest.fixture(scope="module")
def eval_predictions(run_dir):
    """eval.py's greedy answers (merged weights, per task) for the run's test split."""
    out = run_dir.parent / "eval"
    assert eval_cli.main(["--workdir", str(run_dir), "--out", str(out)]) == 0
    return [json.loads(line) for line in (out / "predictions_test.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def engine(run_dir):
    engine = Engine.from_workdir(run_dir, CONFIG)
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def url(engine):
    with BackgroundServer(create_app(engine)) as server:
        yield server.url


def complete(url, **body):
    response = httpx.post(f"{url}/v1/completions", json={"temperature": 0, **body}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for(condition, what: str, seconds: float = 20.0):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_models_health_and_one_base_in_memory(engine, url):
    ids = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
    assert ids == [*TASKS, BASE_MODEL_ID]
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["groups"] == {
        "demo_run": {"slots": 8, "active": 0}, BASE_MODEL_ID: {"slots": 8, "active": 0}}
    # every slot group computes on the very base arrays (no copy), the cluster's adapters beside them
    base_leaves = jax.tree.leaves(engine.server.base.params)
    for group in engine.groups.values():
        frozen, adapters = split_params(group.slots.params)
        assert all(a is b for a, b in zip(jax.tree.leaves(frozen), base_leaves, strict=True))
        assert bool(jax.tree.leaves(adapters)) == (group.name != BASE_MODEL_ID)
    report = "\n".join(engine.memory_report())
    assert "MiB of parameters, held once" in report and "adapter set 'demo_run'" in report


def test_greedy_answers_over_http_equal_eval(url, eval_predictions):
    assert {p["task_dataset"] for p in eval_predictions} == set(TASKS) and len(eval_predictions) == 24
    assert len({p["target"] for p in eval_predictions}) > 12  # diverse answers, not all alike

    async def ask_all():
        async with httpx.AsyncClient(timeout=60) as client:
            async def ask(p):
                r = await client.post(f"{url}/v1/completions", json={
                    "model": p["task_dataset"], "prompt": p["input"], "max_tokens": NEW, "temperature": 0})
                return r.json()["choices"][0]["text"]
            return await asyncio.gather(*(ask(p) for p in eval_predictions))

    answers = asyncio.run(ask_all())
    assert [a.strip() for a in answers] == [p["target"] for p in eval_predictions]


def reference_answer(engine, model_id, prompt_ids, max_new):
    """The greedy answer of one request alone, by models.generate (batch 1), cut like eval's."""
    group_name, task_id = engine.routes[model_id]
    group = engine.groups[group_name].slots
    stops = list(engine.prompts.stop_ids)
    ids = np.asarray(generate(group.model, group.params, np.asarray([prompt_ids]), None,
                              np.asarray([task_id]) if group.adapted else None, max_new_tokens=max_new,
                              eos_token_id=stops, pad_token_id=engine.prompts.format.pad_id))[0].tolist()
    return ids[: next((i for i, t in enumerate(ids) if t in stops), len(ids))]


def test_200_concurrent_mixed_task_requests_each_equal_its_answer_alone(engine, url, eval_predictions):
    rng = np.random.default_rng(1)
    # prompts of one generate bucket (17 to 32 ids): few compiles for the references
    prompts = [p["input"] for p in eval_predictions if 16 < len(p["input"]) + 2 <= 32][:12]
    assert len(prompts) >= 6
    models = [*TASKS, BASE_MODEL_ID]
    requests = []
    for _ in range(200):
        request = {"model": models[rng.integers(4)], "prompt": prompts[rng.integers(len(prompts))],
                   "max_tokens": int(rng.integers(1, 13)), "temperature": 0}
        if rng.random() < 0.2:
            request["stop"] = [engine.prompts.tokenizer.decode([int(rng.integers(6, 60))])]
        requests.append(request)
    references = {}
    for request in requests:
        key = (request["model"], request["prompt"])
        if key not in references:
            references[key] = reference_answer(engine, *key[:1], engine.prompts.completion(key[1]), 12)

    def expected(request):
        text = engine.prompts.tokenizer.decode(references[request["model"], request["prompt"]][: request["max_tokens"]])
        cuts = [i for i in (text.find(s) for s in request.get("stop", [])) if i >= 0]
        return text[: min(cuts)] if cuts else text

    async def ask_all():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=200)) as client:
            async def ask(body):
                return (await client.post(f"{url}/v1/completions", json=body)).json()
            return await asyncio.gather(*(ask(r) for r in requests))

    answers = asyncio.run(ask_all())
    assert [a["choices"][0]["text"] for a in answers] == [expected(r) for r in requests]
    assert len({(r["model"], a["choices"][0]["text"]) for r, a in zip(requests, answers)}) > 40
    assert engine.stats()["queued"] == 0


def stream_text(url, route, body):
    pieces, finish, lines = [], None, []
    with httpx.stream("POST", f"{url}{route}", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line:
                lines.append(line)
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        choice = json.loads(line[len("data: "):])["choices"][0]
        piece = choice["delta"].get("content") if "delta" in choice else choice["text"]
        pieces.append(piece or "")
        finish = choice["finish_reason"] or finish
    return "".join(pieces), finish


def test_streaming_yields_the_same_text(url, eval_predictions):
    for p in eval_predictions[:6]:
        body = {"model": p["task_dataset"], "prompt": p["input"], "max_tokens": NEW, "temperature": 0}
        whole = complete(url, **body)["choices"][0]
        assert stream_text(url, "/v1/completions", body) == (whole["text"], whole["finish_reason"])
        stop = {**body, "stop": [whole["text"][2:4]]} if len(whole["text"]) > 4 else body
        cut = complete(url, **stop)["choices"][0]
        assert stream_text(url, "/v1/completions", stop) == (cut["text"], cut["finish_reason"])
        chat = {"model": p["task_dataset"], "messages": [{"role": "user", "content": p["input"]}],
                "max_tokens": NEW, "temperature": 0}
        answer = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60).json()["choices"][0]
        assert answer["message"]["content"] == whole["text"]  # no chat template: the plain join of one message
        assert stream_text(url, "/v1/chat/completions", chat) == (answer["message"]["content"], answer["finish_reason"])


def test_stop_strings_max_tokens_and_usage(url, eval_predictions):
    p = next(p for p in eval_predictions if len(p["target"]) >= 6)
    body = {"model": p["task_dataset"], "prompt": p["input"], "max_tokens": NEW}
    whole = complete(url, **body)
    text = whole["choices"][0]["text"]
    assert whole["usage"]["completion_tokens"] <= NEW and whole["usage"]["prompt_tokens"] == len(p["input"]) + 2
    cut = complete(url, **body, stop=["zz", text[3:5]])["choices"][0]
    assert (cut["text"], cut["finish_reason"]) == (text[: text.find(text[3:5])], "stop")
    short = complete(url, **{**body, "max_tokens": 2})
    assert short["choices"][0]["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 2
    assert text.startswith(short["choices"][0]["text"])


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(url, eval_predictions):
    body = {"model": TASKS[2], "prompt": eval_predictions[0]["input"], "max_tokens": 12, "temperature": 1.5,
            "top_k": 40, "top_p": 0.95, "ignore_eos": True}

    async def ask_all(bodies):
        async with httpx.AsyncClient(timeout=60) as client:
            return [r.json()["choices"][0]["text"] for r in
                    await asyncio.gather(*(client.post(f"{url}/v1/completions", json=b) for b in bodies))]

    alone = complete(url, **body, seed=7)["choices"][0]["text"]
    crowd = asyncio.run(ask_all([{**body, "seed": s} for s in (7, 1, 2, 3, 7, 4)]))
    assert crowd[0] == crowd[4] == alone
    assert len(set(crowd)) > 1  # other seeds draw other answers
    greedy = complete(url, **{**body, "temperature": 0})["choices"][0]["text"]
    assert alone != greedy


BAD_INPUTS = [  # (route, body, status, param, words in the message)
    ("/v1/completions", {"model": "NoSuchTask", "prompt": "x"}, 404, "model", ["NoSuchTask", *TASKS, "base"]),
    ("/v1/completions", {"model": TASKS[0], "prompt": "长" * 200}, 400, "prompt", ["202 tokens", "64 tokens"]),
    ("/v1/completions", {"model": TASKS[0], "prompt": "x", "max_tokens": 62}, 400, "max_tokens",
     ["maximum context length is 64", "requested 65 tokens"]),
    ("/v1/completions", {"model": TASKS[0], "prompt": "x", "max_tokens": 0}, 400, "max_tokens", ["minimum of 1"]),
    ("/v1/completions", {"model": TASKS[0], "prompt": "x", "max_tokens": "8"}, 400, "max_tokens", ["integer"]),
    ("/v1/completions", {"model": TASKS[0], "prompt": "x", "max_tokens": True}, 400, "max_tokens", ["integer"]),
    ("/v1/completions", {"model": TASKS[0], "prompt": "x", "temperature": -0.1}, 400, "temperature", ["minimum of 0"]),
    ("/v1/completions", {"model": TASKS[0], "prompt": "x", "temperature": "hot"}, 400, "temperature", ["number"]),
    ("/v1/completions", {"model": TASKS[0], "prompt": "x", "top_p": 0}, 400, "top_p", ["(0, 1]"]),
    ("/v1/completions", {"model": TASKS[0], "prompt": "x", "n": 2}, 400, "n", ["n=1"]),
    ("/v1/completions", {"model": TASKS[0], "prompt": "x", "stop": [1]}, 400, "stop", ["string"]),
    ("/v1/completions", {"model": TASKS[0], "prompt": "x", "stream": "yes"}, 400, "stream", ["true or false"]),
    ("/v1/completions", {"model": TASKS[0], "prompt": "x", "logprobs": 3}, 400, "logprobs", ["not supported"]),
    ("/v1/completions", {"model": TASKS[0], "prompt": ""}, 400, "prompt", ["empty"]),
    ("/v1/completions", {"model": TASKS[0], "prompt": []}, 400, "prompt", ["empty"]),
    ("/v1/completions", {"model": TASKS[0], "prompt": ["a", "b"]}, 400, "prompt", ["one prompt per request"]),
    ("/v1/completions", {"model": TASKS[0], "prompt": [5, 10**6]}, 400, "prompt", ["outside the vocabulary"]),
    ("/v1/completions", {"model": TASKS[0], "prompt": 42}, 400, "prompt", ["a int"]),
    ("/v1/completions", {"model": 3, "prompt": "x"}, 400, "model", ["model id"]),
    ("/v1/completions", {"prompt": "x"}, 400, "model", ["model id"]),
    ("/v1/completions", [1, 2], 400, None, ["JSON object"]),
    ("/v1/chat/completions", {"model": TASKS[0], "messages": []}, 400, "messages", ["non-empty list"]),
    ("/v1/chat/completions", {"model": TASKS[0], "messages": [{"role": "user", "content": ""}]}, 400, "messages",
     ["empty"]),
    ("/v1/chat/completions", {"model": TASKS[0], "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages[0].role", ["robot"]),
    ("/v1/chat/completions", {"model": TASKS[0], "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content", ["string"]),
    ("/v1/chat/completions", {"model": TASKS[0], "messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": -1}, 400, "max_completion_tokens", ["minimum of 1"]),
]


@pytest.mark.parametrize("route,body,status,param,words", BAD_INPUTS)
def test_bad_input_gets_an_openai_error_and_the_server_goes_on(url, route, body, status, param, words):
    response = httpx.post(f"{url}{route}", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert error["type"] == "invalid_request_error"
    for word in words:
        assert word in error["message"], (word, error["message"])
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_malformed_json_and_unknown_routes(url):
    for raw in (b"{bad", b"\xff\xfe", b""):
        response = httpx.post(f"{url}/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400
        assert "not valid JSON" in response.json()["error"]["message"]
    response = httpx.get(f"{url}/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["message"] == "Not Found"
    assert complete(url, model=TASKS[0], prompt="你好", max_tokens=2)["choices"][0]["finish_reason"]


@pytest.fixture
def slow_steps(engine, monkeypatch):
    """Each decode step of the run's group takes 20 ms more, so a long answer is still running
    when the test acts."""
    slots = engine.groups["demo_run"].slots
    step = slots.step
    monkeypatch.setattr(slots, "step", lambda *a: (time.sleep(0.02), step(*a))[1])
    yield engine
    engine.resume()


def active(engine):
    return engine.stats()["groups"]["demo_run"]["active"]


LONG = {"model": TASKS[1], "prompt": "你好", "max_tokens": 50, "ignore_eos": True, "temperature": 0}


def test_a_streaming_client_that_disconnects_frees_its_slot_at_once(url, slow_steps):
    engine = slow_steps
    with httpx.stream("POST", f"{url}/v1/completions", json={**LONG, "stream": True}, timeout=60) as response:
        next(response.iter_lines())
        assert active(engine) == 1
        engine.pause()  # nothing more is generated: only the disconnect can free the slot
    wait_for(lambda: active(engine) == 0, "the slot to be freed")


def test_a_waiting_client_that_disconnects_frees_its_slot_and_its_queue_place(url, slow_steps):
    engine = slow_steps

    async def leave_early():
        async with httpx.AsyncClient(timeout=60) as client:
            task = asyncio.ensure_future(client.post(f"{url}/v1/completions", json=LONG))
            while active(engine) == 0:
                await asyncio.sleep(0.005)
            engine.pause()
            task.cancel()  # closes the connection mid-request
            queued = asyncio.ensure_future(client.post(f"{url}/v1/completions", json=LONG))
            while engine.stats()["queued"] == 0:
                await asyncio.sleep(0.005)
            queued.cancel()

    asyncio.run(leave_early())
    wait_for(lambda: active(engine) == 0 and engine.stats()["queued"] == 0, "the slot and the queue to empty")


def test_a_full_queue_answers_429(url, engine, monkeypatch):
    monkeypatch.setattr(engine, "config", dataclasses.replace(engine.config, max_queue=3))
    engine.pause()
    try:
        async def overfill():
            async with httpx.AsyncClient(timeout=60) as client:
                body = {"model": TASKS[0], "prompt": "你好", "max_tokens": 3, "temperature": 0}
                waiting = [asyncio.ensure_future(client.post(f"{url}/v1/completions", json=body)) for _ in range(3)]
                while engine.stats()["queued"] < 3:
                    await asyncio.sleep(0.005)
                refused = await client.post(f"{url}/v1/completions", json=body)
                engine.resume()
                return refused, await asyncio.gather(*waiting)

        refused, served = asyncio.run(overfill())
    finally:
        engine.resume()
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "queue_full" and "3 requests waiting" in refused.json()["error"]["message"]
    assert [r.status_code for r in served] == [200, 200, 200]


def test_the_openai_client_talks_to_it(url, eval_predictions):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [*TASKS, BASE_MODEL_ID]
    p = eval_predictions[0]
    completion = client.completions.create(model=p["task_dataset"], prompt=p["input"], max_tokens=NEW, temperature=0)
    assert completion.choices[0].text.strip() == p["target"]
    chat = client.chat.completions.create(model=p["task_dataset"], messages=[{"role": "user", "content": p["input"]}],
                                          max_tokens=NEW, temperature=0)
    assert chat.choices[0].message.content == completion.choices[0].text
    stream = client.chat.completions.create(model=p["task_dataset"], messages=[{"role": "user", "content": p["input"]}],
                                            max_tokens=NEW, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    with pytest.raises(openai.NotFoundError, match="Available models: CategoryClassification"):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=TASKS[0], prompt="x", temperature=-1)


class CharTokenizer:
    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def pushed(text, **params):
    loop = asyncio.new_event_loop()
    gen = Generation([1], SamplingParams(**{"max_tokens": 50, **params}), CharTokenizer(), [0], loop, seed=0)
    for c in text:
        if gen.push(ord(c) if c != "$" else 0):
            break
    loop.run_until_complete(asyncio.sleep(0))
    events = []
    while not gen.events.empty():
        events.append(gen.events.get_nowait())
    loop.close()
    return [e.text for e in events if isinstance(e, TextDelta)], events[-1]


def test_text_deltas_hold_back_what_may_start_a_stop_string():
    assert pushed("abc$def") == (["a", "b", "c"], Finished("stop", 1, 3))  # eos ends, not part of the answer
    assert pushed("abc$d", ignore_eos=True, max_tokens=5)[0] == ["a", "b", "c", "\x00", "d"]
    deltas, end = pushed("hello world", stop=("wor",))
    assert "".join(deltas) == "hello " and end.reason == "stop"
    assert deltas[:3] == ["h", "e", "l"]  # held back 2 = len("wor") - 1 characters at each step
    assert pushed("abcdef", max_tokens=3) == (["a", "b", "c"], Finished("length", 1, 3))


def tiny_llama():
    from cgc_lora_jax.models.llama import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6)
    model = LlamaForCausalLM(cfg, lora=CGCLoRAConfig(num_tasks=3, num_common=2, common_rank=2, specific_rank=2))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 4), jnp.int32), None, jnp.zeros((1,), jnp.int32))
    rng = np.random.default_rng(0)  # random weights, adapters included (so tasks differ); no init compile
    params = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes["params"])
    return model, params


def test_slots_at_their_own_lengths_equal_generate_on_llama():
    """Requests join a running decode batch at different steps, with different tasks and prompt
    lengths; each slot's tokens equal models.generate's for that prompt and task alone."""
    model, params = tiny_llama()
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 96, n).tolist() for n in (5, 13, 16, 2)]  # one bucket: few compiles
    tasks, new = [0, 2, 1, 2], 10
    want = [np.asarray(generate(model, params, np.asarray([p]), None, np.asarray([t]), max_new_tokens=new,
                                eos_token_id=None, pad_token_id=0))[0].tolist() for p, t in zip(prompts, tasks)]
    group = SlotGroup(model, params, slots=4, length=48, prefill_batch=2)
    task_ids, sampling, counts = np.zeros(4, np.int32), Sampling.greedy(4), np.zeros(4, np.int32)
    got = {}

    def join(rows, slots, bucket):
        first = group.prefill([prompts[r] for r in rows], bucket, [tasks[r] for r in rows], slots,
                              Sampling.greedy(2), pad_id=0)
        for r, s, token in zip(rows, slots, first):
            task_ids[s], got[s] = tasks[r], [int(token)]

    def step(times):
        for _ in range(times):
            out = group.step(task_ids, sampling, counts)
            for s in got:
                got[s].append(int(out[s]))

    join([0, 1], [3, 1], 16)
    step(3)
    join([2], [0], 16)
    step(4)
    assert got[3] == want[0][:8]  # slot 3 leaves after 8 tokens; prompt 3 takes it over
    join([3], [3], 16)
    step(new)
    assert got[1][:new] == want[1] and got[0][:new] == want[2] and got[3][:new] == want[3]


def test_one_plus_n_folder_one_slot_group_per_cluster_over_one_base(run_dir, tmp_path):
    """A 1+N folder of two clusters (the run, and a copy whose tasks are renamed): a slot group
    per cluster plus the bare base's, every task routed to its cluster, the base arrays held once."""
    import shutil

    shutil.copytree(run_dir, tmp_path / "a", ignore=shutil.ignore_patterns("checkpoints", "data"))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    renamed = [f"B-{t}" for t in TASKS]
    (tmp_path / "b" / "task_vocab.json").write_text(json.dumps({"tasks": renamed}))
    meta = json.loads((tmp_path / "b" / "adapters" / "meta.json").read_text())
    (tmp_path / "b" / "adapters" / "meta.json").write_text(json.dumps({**meta, "task_vocab": renamed}))
    (tmp_path / "clusters.json").write_text(json.dumps({"clusters": {"a": list(TASKS), "b": renamed}}))
    engine = Engine.from_workdir(tmp_path, EngineConfig(slots=2, context=32, prefill_batch=1))
    assert list(engine.groups) == ["a", "b", BASE_MODEL_ID]
    assert engine.routes == {**{t: ("a", i) for i, t in enumerate(TASKS)},
                             **{t: ("b", i) for i, t in enumerate(renamed)}, BASE_MODEL_ID: (BASE_MODEL_ID, 0)}
    base_leaves = jax.tree.leaves(engine.server.base.params)
    for group in engine.groups.values():
        frozen, _ = split_params(group.slots.params)
        assert all(a is b for a, b in zip(jax.tree.leaves(frozen), base_leaves, strict=True))
    assert "adapter set 'b': tasks B-CategoryClassification" in "\n".join(engine.memory_report())


def test_readme_serving_example_runs(url, capsys):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Serving: 1 + N over HTTP", 1)[1].split("\n## ", 1)[0]
    (block,) = [b for b in section.split("```python\n")[1:]]
    code = block.split("```", 1)[0].replace("http://127.0.0.1:8000", url)
    exec(compile(code, "README.md:Serving", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert out.startswith(str([*TASKS, BASE_MODEL_ID]) + "\n")
    answer = complete(url, model="DigitsToChinese", prompt="把数字写成汉字：305\n答：", max_tokens=16)
    assert f"\n{answer['choices'][0]['text']}\n" in out


def test_prefill_buckets_and_the_readme_command_flags():
    from cgc_lora_jax.serve.__main__ import parse_args

    assert EngineConfig(context=512).buckets() == (16, 32, 64, 128, 256, 512)
    assert EngineConfig(context=512, max_prompt=100).buckets() == (16, 32, 64, 128)
    assert EngineConfig(context=64, min_bucket=32).buckets() == (32, 64)
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    command = readme.split("## Serving: 1 + N over HTTP", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    argv = command.replace("\\\n", " ").replace("[", "").replace("]", "").split()[3:]
    args = parse_args(argv)
    assert (args.workdir, args.host, args.port, args.slots, args.context) == ("runs/demo", "127.0.0.1", 8000, 16, 512)


def test_chat_prompts_use_the_tokenizer_chat_template_when_it_has_one():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from cgc_lora_jax.serve.prompts import PromptBuilder

    words = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "user", "assistant", "hi", "\n", "[UNK]"]
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Split("\n", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="[UNK]", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    templated = PromptBuilder("llama", tok)
    assert templated.chat_mode == "the tokenizer's chat template"
    # <|im_start|> user \n hi <|im_end|> \n <|im_start|> assistant \n: the template's tokens, no bos added
    assert templated.chat([{"role": "user", "content": "hi"}]) == [3, 5, 8, 7, 4, 8, 3, 6, 8]
    # a completion is framed as in training: the template under "auto", [bos] + P under "plain"
    assert templated.completion("hi") == [3, 5, 8, 7, 4, 8, 3, 6, 8]
    assert PromptBuilder("llama", tok, prompt_format="plain").completion("hi") == [0, 7]
    tok.chat_template = None
    plain = PromptBuilder("llama", tok)
    assert plain.chat_mode == "plain join of the message contents"
    assert plain.chat([{"role": "system", "content": "hi"}, {"role": "user", "content": "hi"}]) == [0, 7, 8, 7]
