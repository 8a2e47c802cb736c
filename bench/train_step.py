"""Training-step time of CGC-LoRA vs plain LoRA vs the frozen floor, ours vs HF PEFT, and 6B scale.

Parts (the table rows; the JSON line printed last holds every figure, null where a part was skipped):
  chatglm  a small ChatGLM-6B-architecture model (width 512, 4 blocks, 8 heads, MLP 2048, vocab
           8000, 8 x 512 tokens, float32), one jit training step of (cgc) CGC-LoRA, N_c = 8 common
           experts of rank 2 + a rank-2 expert per task for 8 tasks, shared gate, a mixed-task batch,
           on query_key_value|dense|dense_h_to_4h|dense_4h_to_h; (lora) plain LoRA of the same total
           rank 32 on the same layers; (floor) the frozen model's forward + backward with respect to
           the input embeddings only, no adapters. The LoRA variants run the library's
           `make_train_step` (AdamW, clipping); the floor is the least any adapter step must cost.
  llama    a tiny Llama (width 256, 4 blocks, 8 x 256 tokens, float32) with LoRA rank 8 on
           q_proj|v_proj: our jit step vs HF PEFT (LoraConfig r=8) on the same weights in PyTorch on
           this CPU (AdamW, clipping, torch threads = --torch-threads). Both see the same batch and
           must report the same initial loss. ours_over_peft = our step time / PEFT's (< 1: faster).
  host-memory  (--parts host-memory) the step of configs/med8.py's shapes (SmolLM2-135M, random
           weights, CGC-LoRA N_c = 4 x rank 2 + rank 1 per task on every block linear, 8 x (256 +
           64) tokens, float32) in two child processes, one with glibc's defaults and one after
           cgc_lora_jax.host_memory.reuse_freed_memory(): step time, kernel (sys) time and minor
           page faults per step, medians after the first step; `host_memory_speedup` = plain / reused.
           XLA:CPU allocates the step's 6.5 GB of temporaries per call; by default glibc maps and
           unmaps them every step. Every other part runs after reuse_freed_memory(), as the entry
           points do (torch's PEFT steps alike), unless --plain-malloc.
  glm6b    (--glm6b) one CGC-LoRA step of a ChatGLM-6B-shaped model (width 4096, 28 blocks, 32 heads,
           MLP 16384, vocab 130528) with random bf16 weights, remat, 1 x 256 tokens, in a child
           process whose peak RSS (GiB, 2^30 bytes) is read after it exits. The base is generated leaf by leaf
           directly in bf16 by a counter-hash generator, so no float32 copy of it ever exists. The
           child runs with XLA:CPU's memory-minimising schedule (see LOW_MEMORY_CPU_SCHEDULE).
  gpu      (--gpu, on a GPU only) the same 6B-shaped model in bf16 at --gpu-seq tokens per row:
           tokens/s and model FLOPs utilisation, MFU = tokens/s * F / --peak-flops, with
               F = 4 N_base + 6 N_adapt + 12 L S d    model FLOPs per token
           (frozen base: forward 2 N and input gradient 2 N, no weight gradient; adapters: forward,
           input and weight gradient, 6 N_adapt; attention scores and mixing, forward + backward,
           12 L S d for L blocks of width d at sequence length S; remat's recompute is not counted).
           `gpu_mfu_6n` uses the full-fine-tuning convention 6 (N_base + N_adapt) instead.

Variants run interleaved round by round and medians are reported, so load on this shared machine
hits all alike; the ratios are what matters.

    python bench/train_step.py                   # chatglm + llama parts, ~3 minutes on 2 cores
    python bench/train_step.py --glm6b           # + the 6B step: needs ~20 GB of free RAM
    python bench/train_step.py --glm6b --skip-small
    python bench/train_step.py --gpu --peak-flops 989e12   # on an H100 SXM
    python bench/train_step.py --parts host-memory           # ~4 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import types
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import flax.linen as nn  # noqa: E402
from flax import traverse_util  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench._common import interleaved_medians, matmul_calls, run_child_peak_rss  # noqa: E402
from cgc_lora_jax.cli.train import LOW_MEMORY_CPU_SCHEDULE  # noqa: E402
from cgc_lora_jax.host_memory import reuse_freed_memory  # noqa: E402
from cgc_lora_jax.layers import CGCLoRAConfig, init_adapters as draw_adapters  # noqa: E402
from cgc_lora_jax.params import count_parameters, split_params  # noqa: E402
from cgc_lora_jax.loss import IGNORE, token_losses  # noqa: E402
from cgc_lora_jax.training.step import TrainState, make_optimizer, make_train_step  # noqa: E402
from cgc_lora_jax.models import chatglm, llama  # noqa: E402

GLM_TARGETS = r"query_key_value|dense|dense_h_to_4h|dense_4h_to_h"
REAL_TARGETS = r"q_proj|v_proj"
SPECIAL_IDS = dict(pad_token_id=1, mask_token_id=2, gmask_token_id=3, bos_token_id=4, eos_token_id=5)
SMALL_GLM = dict(vocab_size=8000, hidden_size=512, num_layers=4, num_attention_heads=8, inner_hidden_size=2048,
                 layernorm_epsilon=1e-5, max_sequence_length=1024, position_encoding_2d=True, **SPECIAL_IDS)
GLM6B = dict(vocab_size=130528, hidden_size=4096, num_layers=28, num_attention_heads=32, inner_hidden_size=16384,
             layernorm_epsilon=1e-5, max_sequence_length=2048, position_encoding_2d=True, pad_token_id=3,
             mask_token_id=130000, gmask_token_id=130001, bos_token_id=130004, eos_token_id=130005)
TINY_LLAMA = dict(model_type="llama", vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=512,
                  rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False)
# AdamW at a constant peak rate with global-norm clipping; PEFT's side gets the same.
OPTIMIZER = types.SimpleNamespace(lr=2e-4, warmup_steps=0, steps=1000, end_lr_ratio=1.0, weight_decay=0.0,
                                  grad_clip=1.0)
GIB = 1024**3
# XLA:CPU's memory-minimising schedule, which train.py adds under model.remat (see there why).


def cgc_config(num_tasks: int = 8) -> CGCLoRAConfig:
    return CGCLoRAConfig(num_tasks, num_common=8, common_rank=2, specific_rank=2, gate="shared", targets=GLM_TARGETS)


def glm_batch(hf: dict, batch: int, seq: int, num_tasks: int, seed: int = 0) -> dict:
    """Random prompt + [gMASK] <sop> + target rows (the training layout), loss on the target half."""
    rng = np.random.default_rng(seed)
    # Ordinary tokens: above the small configs' special ids, below ChatGLM-6B's (130000 and up).
    high = hf["mask_token_id"] if hf["mask_token_id"] > 10 else hf["vocab_size"]
    ids = rng.integers(10, high, (batch, seq))
    sop = seq // 2
    ids[:, sop - 1], ids[:, sop] = hf["gmask_token_id"], hf["bos_token_id"]
    labels = np.full_like(ids, IGNORE)
    labels[:, sop + 1:] = ids[:, sop + 1:]
    tasks = np.arange(batch) % num_tasks  # every batch mixes tasks
    return {"input_ids": jnp.asarray(ids, jnp.int32), "labels": jnp.asarray(labels, jnp.int32),
            "task_ids": jnp.asarray(tasks, jnp.int32)}


def init_adapters(model, batch: dict, seed: int = 1) -> dict:
    """The adapters' initial values as a training run draws them (layers.init_adapters)."""
    abstract = jax.eval_shape(lambda key: model.init(key, batch["input_ids"], None, batch["task_ids"])["params"],
                              jax.random.key(0))
    flat = traverse_util.flatten_dict(split_params(abstract)[1])
    return traverse_util.unflatten_dict(draw_adapters(flat, model.lora, seed))


def train_call(model, base: dict, adapters: dict, batch: dict, num_tasks: int):
    """A zero-argument call running one jit `make_train_step` step (state donated and carried)."""
    tx, schedule = make_optimizer(OPTIMIZER)
    step = jax.jit(make_train_step(model, tx, schedule, num_tasks), donate_argnums=0)
    holder = {"state": TrainState.create(adapters, tx, seed=0), "losses": []}

    def call():
        holder["state"], metrics = step(holder["state"], base, batch)
        holder["losses"].append(metrics["loss"])
        return holder["state"], metrics

    return call, holder


def floor_call(model, base: dict, batch: dict):
    """Forward + backward of the frozen model (no adapters) w.r.t. the input embeddings only."""

    def loss(delta_btd, base, batch):
        def add_delta(next_fun, args, kwargs, context):  # x = embed(ids) + delta, inside the model
            out = next_fun(*args, **kwargs)
            is_lookup = isinstance(context.module, nn.Embed) and context.method_name == "__call__"
            return out + delta_btd.astype(out.dtype) if is_lookup else out

        with nn.intercept_methods(add_delta):
            logits = model.apply({"params": base}, batch["input_ids"])
        nll, mask = token_losses(logits, batch["labels"])
        return nll.sum() / jnp.maximum(mask.sum(), 1)

    grad = jax.jit(jax.grad(loss))
    delta = jnp.zeros(batch["input_ids"].shape + (model.config.hidden_size,), model.dtype)
    holder = {}

    def call():
        holder["grad"] = grad(delta, base, batch)
        return holder["grad"]

    return call, holder


def bench_chatglm(args) -> dict:
    cfg, cgc = chatglm.ChatGLMConfig.from_hf(SMALL_GLM), cgc_config()
    lora = CGCLoRAConfig.lora_full(cgc.num_tasks, rank=cgc.total_rank, targets=GLM_TARGETS)
    batch = glm_batch(SMALL_GLM, args.batch, args.seq, cgc.num_tasks)
    frozen = chatglm.build(cfg)
    base = jax.jit(lambda k: frozen.init(k, batch["input_ids"])["params"])(jax.random.key(0))
    models = {"cgc": chatglm.build(cfg, lora=cgc), "lora": chatglm.build(cfg, lora=lora)}
    calls, trainable = {}, {"floor": 0}
    calls["floor"], floor_out = floor_call(frozen, base, batch)
    for name, model in models.items():
        adapters = init_adapters(model, batch)
        calls[name], _ = train_call(model, base, adapters, batch, cgc.num_tasks)
        trainable[name] = count_parameters(adapters)[0]
    med = interleaved_medians(calls, args.rounds, wait=jax.block_until_ready)
    if not float(jnp.abs(floor_out["grad"]).max()) > 0:  # the embedding hook must have taken effect
        raise AssertionError("the floor's input-embedding gradient is zero: it timed a forward pass only")
    tokens = args.batch * args.seq
    print(f"\n[chatglm] width {cfg.hidden_size}, {cfg.num_layers} blocks, vocab {cfg.vocab_size}, "
          f"{args.batch} x {args.seq} "
          f"tokens, float32, {jax.devices()[0].platform} x{jax.device_count()}, median of {args.rounds} rounds")
    print(f"{'variant':<8} {'trainable':>10} {'step ms':>9} {'tokens/s':>9} {'/ floor':>8} {'/ lora':>7}")
    for name in ("floor", "lora", "cgc"):
        t = med[name]
        print(f"{name:<8} {trainable[name]:>10,} {t * 1e3:9.1f} {tokens / t:9.0f} "
              f"{t / med['floor']:8.3f} {t / med['lora']:7.3f}")
    return {"cgc_over_lora": med["cgc"] / med["lora"], "cgc_over_floor": med["cgc"] / med["floor"],
            "lora_over_floor": med["lora"] / med["floor"], "chatglm_step_ms": {k: v * 1e3 for k, v in med.items()},
            "chatglm_tokens_per_s": {k: tokens / v for k, v in med.items()}}


def torch_llama_to_flax(torch_model, cfg: llama.LlamaConfig) -> dict:
    """Our parameter tree from the HF model's state dict, by the family's explicit key map."""
    state = torch_model.state_dict()
    flat = {path: jnp.asarray(state[name].numpy().T if transpose else state[name].numpy())
            for name, (path, transpose) in llama.key_map(cfg).items()}
    return traverse_util.unflatten_dict(flat)


def peft_train_call(torch_model, ids: np.ndarray, labels: np.ndarray, autocast_bf16: bool = False):
    """(a zero-argument PEFT LoRA r=8 q_proj/v_proj training step, its list of losses).

    AdamW with our constant rate and clipping. PEFT keeps the adapters in float32 whatever the
    base's dtype (autocast_adapter_dtype), like ours; `autocast_bf16` runs the step under
    torch.autocast(bfloat16) instead of with bf16 weights.
    """
    import contextlib

    import peft
    import torch

    peft_model = peft.get_peft_model(torch_model, peft.LoraConfig(
        r=8, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))  # alpha / r as ours
    peft_model.train()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=OPTIMIZER.lr, weight_decay=OPTIMIZER.weight_decay)
    ids_t, labels_t = torch.as_tensor(ids), torch.as_tensor(labels)
    losses = []

    def step():
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast_bf16 else contextlib.nullcontext()
        with autocast:
            loss = peft_model(input_ids=ids_t, labels=labels_t).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, OPTIMIZER.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # .item() waits for the step: torch on CPU is synchronous anyway
        return None

    return step, losses


def bench_llama_vs_peft(args) -> dict:
    import warnings

    import torch
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # raised inside PEFT

    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    torch_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)).float()
    cfg = llama.LlamaConfig.from_hf(TINY_LLAMA)
    base = torch_llama_to_flax(torch_model, cfg)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (args.batch, args.llama_seq))
    labels = ids.copy()
    labels[:, : args.llama_seq // 2] = IGNORE  # loss on the second half, like a prompt + target
    batch = {"input_ids": jnp.asarray(ids, jnp.int32), "labels": jnp.asarray(labels, jnp.int32),
             "task_ids": jnp.zeros((args.batch,), jnp.int32)}
    model = llama.build(cfg, lora=CGCLoRAConfig.lora_full(1, rank=8, targets=r"q_proj|v_proj"))
    ours, ours_log = train_call(model, base, init_adapters(model, batch), batch, num_tasks=1)

    peft_step, peft_losses = peft_train_call(torch_model, ids, labels)
    med = interleaved_medians({"ours": ours, "peft": peft_step}, args.rounds, wait=jax.block_until_ready)
    first_ours, first_peft = float(ours_log["losses"][0]), peft_losses[0]
    if abs(first_ours - first_peft) > 1e-4 * abs(first_peft):  # same weights, B = 0: same base loss
        raise AssertionError(f"initial losses differ: ours {first_ours} vs PEFT {first_peft}: not the same model")
    tokens = args.batch * args.llama_seq
    print(f"\n[llama] width {cfg.hidden_size}, {cfg.num_hidden_layers} blocks, {args.batch} x {args.llama_seq} tokens, "
          f"LoRA r=8 on q_proj|v_proj; torch {torch.__version__} x{torch.get_num_threads()} threads, "
          f"attention {torch_model.config._attn_implementation}; "
          f"initial loss ours {first_ours:.5f} / PEFT {first_peft:.5f}")
    print(f"{'variant':<8} {'step ms':>9} {'tokens/s':>9} {'/ peft':>7}")
    for name, t in med.items():
        print(f"{name:<8} {t * 1e3:9.1f} {tokens / t:9.0f} {t / med['peft']:7.3f}")
    return {"ours_over_peft": med["ours"] / med["peft"], "llama_step_ms": {k: v * 1e3 for k, v in med.items()},
            "llama_initial_loss": {"ours": first_ours, "peft": first_peft}}


def real_flops_per_token(base_params: int, adapter_params: int, cfg: llama.LlamaConfig, seq: int) -> float:
    """Model FLOPs per token of an adapter step (no remat recompute):

        F = 4 N_base + 6 N_adapt + 12 L S d_attn

    frozen base: forward 2 N and input gradient 2 N, no weight gradient (N_base counts the tied
    embedding once: it is the head's matmul); adapters: forward, input and weight gradient 6 N;
    attention scores and mixing, forward + backward, 12 L S d_attn (d_attn = heads x head_dim,
    S the full row length, causal masking not discounted: the usual convention).
    """
    d_attn = cfg.num_attention_heads * cfg.head_dim
    return 4 * base_params + 6 * adapter_params + 12 * cfg.num_hidden_layers * seq * d_attn


def real_batch(cfg: llama.LlamaConfig, batch: int, source: int, target: int, num_tasks: int, seed: int = 0):
    """Random ids [batch, source + target], loss on the last `target` tokens; tasks cycle over rows."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, cfg.vocab_size, (batch, source + target))
    labels = ids.copy()
    labels[:, :source] = IGNORE
    return ids, labels, {"input_ids": jnp.asarray(ids, jnp.int32), "labels": jnp.asarray(labels, jnp.int32),
                         "task_ids": jnp.asarray(np.arange(batch) % num_tasks, jnp.int32)}


def real_cgc_config() -> CGCLoRAConfig:
    """The CGC-LoRA of the real part: 8 tasks, the default experts, on q_proj / v_proj."""
    return CGCLoRAConfig(8, num_common=8, common_rank=2, specific_rank=2, gate="shared", targets=REAL_TARGETS)


def bench_real(args) -> dict:
    """SmolLM2-135M shapes: matmul ceiling, ours vs PEFT in f32 and bf16, CGC-LoRA bf16, peak RSS."""
    import copy
    import warnings

    import torch

    from bench._smollm2 import random_smollm2

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    torch.set_num_threads(args.torch_threads)
    figures = {}
    if not args.real_skip_rss:
        figures.update(real_peak_rss(args))

    m, k, n = args.batch * args.real_seq, 576, 1536
    ceiling = interleaved_medians(matmul_calls(m, k, n), rounds=15, wait=jax.block_until_ready)
    ceiling = {name: 2 * m * k * n / t for name, t in ceiling.items()}  # FLOP/s

    torch_model, cfg, base32 = random_smollm2()
    source = args.real_seq // 2
    ids, labels, batch = real_batch(cfg, args.batch, source, args.real_seq - source, num_tasks=1)
    _, _, cgc_batch = real_batch(cfg, args.batch, source, args.real_seq - source, num_tasks=8)
    base16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), base32)
    lora = CGCLoRAConfig.lora_full(1, rank=8, targets=REAL_TARGETS)
    bf16 = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ours = {"ours_f32": (llama.build(cfg, lora=lora), base32, batch, 1),
            "ours_bf16": (llama.build(cfg, lora=lora, **bf16), base16, batch, 1),
            "cgc_bf16": (llama.build(cfg, lora=real_cgc_config(), **bf16), base16, cgc_batch, 8)}
    calls, logs, adapter_params = {}, {}, {}
    for name, (model, base, b, tasks) in ours.items():
        adapters = init_adapters(model, b)
        adapter_params[name] = count_parameters(adapters)[0]
        calls[name], holder = train_call(model, base, adapters, b, tasks)
        logs[name] = holder["losses"]
    peft_f32 = copy.deepcopy(torch_model)
    peft_bf16 = torch_model if args.peft_bf16 == "autocast" else torch_model.to(torch.bfloat16)
    calls["peft_f32"], logs["peft_f32"] = peft_train_call(peft_f32, ids, labels)
    calls["peft_bf16"], logs["peft_bf16"] = peft_train_call(peft_bf16, ids, labels, args.peft_bf16 == "autocast")
    del base32, base16
    med = interleaved_medians(calls, args.real_rounds, wait=jax.block_until_ready)

    initial = {name: float(losses[0]) for name, losses in logs.items()}
    for ours_name, peft_name, tol in (("ours_f32", "peft_f32", 1e-4), ("ours_bf16", "peft_bf16", 2e-2)):
        if abs(initial[ours_name] - initial[peft_name]) > tol * abs(initial[peft_name]):
            raise AssertionError(f"initial losses differ: {ours_name} {initial[ours_name]} vs "
                                 f"{peft_name} {initial[peft_name]}: not the same model")
    tokens = args.batch * args.real_seq
    base_params = count_parameters(ours["ours_f32"][1])[1]
    print(f"\n[real] SmolLM2-135M shapes (random weights, {base_params / 1e6:.1f} M), {args.batch} x {args.real_seq} "
          f"tokens (loss on the last {args.real_seq - source}), LoRA r=8 / CGC-LoRA (8 tasks) on q_proj|v_proj; "
          f"torch x{torch.get_num_threads()} threads, PEFT bf16 by {args.peft_bf16}; median of {args.real_rounds} rounds")
    print(f"matmul ceiling {m}x{k} @ {k}x{n}: f32 {ceiling['f32'] / 1e9:.1f} GFLOP/s, "
          f"bf16 (f32 accumulation) {ceiling['bf16'] / 1e9:.1f} GFLOP/s")
    print(f"{'variant':<10} {'step s':>8} {'tokens/s':>9} {'/ peft':>7} {'of ceiling':>11} {'init loss':>10}")
    fraction = {}
    for name, t in med.items():
        dtype = "bf16" if name.endswith("bf16") else "f32"
        flops = real_flops_per_token(base_params, adapter_params.get(name, adapter_params["ours_f32"]), cfg,
                                     args.real_seq)
        fraction[name] = tokens / t * flops / ceiling[dtype]
        vs = f"{t / med['peft_' + dtype]:7.3f}"
        print(f"{name:<10} {t:8.2f} {tokens / t:9.0f} {vs} {fraction[name]:11.3f} {initial[name]:10.5f}")
    figures.update({
        "real_ours_over_peft_f32": med["ours_f32"] / med["peft_f32"],
        "real_ours_over_peft_bf16": med["ours_bf16"] / med["peft_bf16"],
        "real_bf16_over_f32": med["ours_bf16"] / med["ours_f32"],
        "real_cgc_bf16_over_lora_bf16": med["cgc_bf16"] / med["ours_bf16"],
        "real_step_s": med, "real_tokens_per_s": {k: tokens / v for k, v in med.items()},
        "real_ceiling_gflops": {k: v / 1e9 for k, v in ceiling.items()},
        "real_fraction_of_ceiling": fraction,
        "real_flops_per_token": real_flops_per_token(base_params, adapter_params["ours_f32"], cfg, args.real_seq),
    })
    return figures


def real_rss_run(batch_size: int, source: int, target: int, steps: int, remat: bool) -> dict:
    """CGC-LoRA steps of the SmolLM2-135M-shaped model in bf16 (random base, no torch imported)."""
    from bench._smollm2 import SMOLLM2_135M

    cfg = llama.LlamaConfig.from_hf(SMOLLM2_135M)
    model = llama.build(cfg, lora=real_cgc_config(), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat=remat)
    _, _, batch = real_batch(cfg, batch_size, source, target, num_tasks=8)
    abstract = jax.eval_shape(lambda k: model.init(k, batch["input_ids"], None, batch["task_ids"])["params"],
                              jax.random.key(0))
    base = random_base(split_params(abstract)[0])
    call, holder = train_call(model, base, init_adapters(model, batch), batch, 8)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return {"step_s": float(np.median(times[1:] if len(times) > 1 else times)),
            "losses": [float(x) for x in holder["losses"]],
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # KiB on Linux


def host_memory_run(steps: int) -> dict:
    """med8's step shapes (float32, every block linear adapted): per step time, sys time, faults."""
    from bench._smollm2 import SMOLLM2_135M

    cfg = llama.LlamaConfig.from_hf(SMOLLM2_135M)
    lora = CGCLoRAConfig(8, num_common=4, common_rank=2, specific_rank=1, gate="shared")
    model = llama.build(cfg, lora=lora)
    _, _, batch = real_batch(cfg, 8, 256, 64, num_tasks=8)
    abstract = jax.eval_shape(lambda k: model.init(k, batch["input_ids"], None, batch["task_ids"])["params"],
                              jax.random.key(0))
    call, holder = train_call(model, random_base(split_params(abstract)[0]), init_adapters(model, batch), batch, 8)
    rows = []
    for _ in range(steps):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        jax.block_until_ready(call())
        after = resource.getrusage(resource.RUSAGE_SELF)
        rows.append({"step_s": time.perf_counter() - start, "sys_s": after.ru_stime - before.ru_stime,
                     "faults": after.ru_minflt - before.ru_minflt})
    return {"rows": rows, "losses": [float(x) for x in holder["losses"]]}


def bench_host_memory(args) -> dict:
    """The med8-shaped step with glibc's default malloc settings vs reuse_freed_memory, each in a
    child process (the setting is per process and must precede JAX's backend)."""
    out = {}
    for mode in ("plain", "reuse"):
        cmd = [sys.executable, __file__, "--host-memory-child", mode, "--host-memory-steps", str(args.host_memory_steps)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the host-memory child ({mode}) failed with exit code {proc.returncode}")
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["plain"]["losses"] != out["reuse"]["losses"]:
        raise AssertionError(f"the two children's losses differ: {out}")
    med = {mode: {k: float(np.median([row[k] for row in r["rows"][1:]])) for k in ("step_s", "sys_s", "faults")}
           for mode, r in out.items()}
    print(f"\n[host-memory] med8 step shapes (SmolLM2-135M, random weights, float32, CGC-LoRA on every block "
          f"linear, 8 x (256 + 64) tokens), medians of steps 2-{args.host_memory_steps}")
    print(f"{'malloc':<8} {'step s':>8} {'sys s':>7} {'faults':>10}")
    for mode, m in med.items():
        print(f"{mode:<8} {m['step_s']:8.2f} {m['sys_s']:7.2f} {m['faults']:10.0f}")
    return {"host_memory_speedup": med["plain"]["step_s"] / med["reuse"]["step_s"], "host_memory": med}


def real_peak_rss(args) -> dict:
    """Peak RSS of the bf16 CGC-LoRA step in child processes: as configured by default, and with
    remat per block under XLA:CPU's memory-minimising schedule (LOW_MEMORY_CPU_SCHEDULE; under
    the default concurrency-optimised schedule remat saves nothing: XLA's temp stays 8.4 GiB).

    Each child reports its own ru_maxrss (RUSAGE_SELF), so the two runs do not mix.
    """
    src, tgt, figures = args.real_rss_source, args.real_rss_target, {}
    for remat in (False, True):
        cmd = [sys.executable, __file__, "--real-rss-child", "--real-rss-batch", str(args.real_rss_batch),
               "--real-rss-source", str(src), "--real-rss-target", str(tgt)] + (["--real-rss-remat"] if remat else [])
        if remat or args.plain_malloc:  # as train.py: remat keeps glibc's defaults (cgc_lora_jax/host_memory.py)
            cmd.append("--plain-malloc")
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {LOW_MEMORY_CPU_SCHEDULE}".strip()}
        rc, out, _ = run_child_peak_rss(cmd, env if remat else None)
        if rc != 0:
            raise RuntimeError(f"the real-shape RSS child (remat={remat}) failed with exit code {rc}")
        r = json.loads(out.strip().splitlines()[-1])
        peak, suffix = r["peak_rss_bytes"] / GIB, "_remat" if remat else ""
        print(f"\n[real] CGC-LoRA bf16 step, {args.real_rss_batch} x ({src} + {tgt}) tokens, remat {remat}"
              f"{' + low-memory schedule' if remat else ''}, in a child process: peak RSS {peak:.2f} GiB, {r['step_s']:.1f} s/step, losses {r['losses']}")
        figures.update({f"real_step_peak_rss_gb{suffix}": peak, f"real_rss_step_s{suffix}": r["step_s"]})
    return figures


def hashed_uniform(shape: tuple[int, ...], dtype, std: float, salt: int) -> jax.Array:
    """Uniform(-sqrt(3) std, sqrt(3) std) from a counter hash of the element index (lowbias32).

    Elementwise and fused: the float32 intermediate never exists as an array, only `dtype` does.
    About 20x faster than jax.random's normal on this CPU, which matters for 6e9 values.
    """
    x = jax.lax.iota(jnp.uint32, int(np.prod(shape))).reshape(shape) * jnp.uint32(0x9E3779B9) + jnp.uint32(salt)
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    unit = ((x ^ (x >> 16)) >> 8).astype(jnp.float32) * (2.0**-24)
    return ((2.0 * unit - 1.0) * (std * 3**0.5)).astype(dtype)


_hashed_leaf = jax.jit(hashed_uniform, static_argnums=(0, 1, 2))  # the salt traced: one compile per shape


def random_base(abstract_base: dict) -> dict:
    """Random frozen weights, one leaf at a time in the leaf's dtype: kernels std 1/sqrt(d_in),
    embeddings std 0.02, LayerNorm scale 1, biases 0."""
    def leaf(path, spec):
        name = path[-1].key
        if name == "scale" or (name == "weight" and len(spec.shape) == 1):  # LayerNorm / RMSNorm
            return jnp.ones(spec.shape, spec.dtype)
        if name == "bias":
            return jnp.zeros(spec.shape, spec.dtype)
        std = 0.02 if name == "embedding" else spec.shape[0] ** -0.5
        return _hashed_leaf(tuple(spec.shape), spec.dtype, std, jnp.uint32(zlib.crc32(jax.tree_util.keystr(path).encode())))

    return jax.tree_util.tree_map_with_path(leaf, abstract_base)


def glm6b_run(batch_size: int, seq: int, steps: int, num_layers: int = GLM6B["num_layers"]) -> dict:
    """CGC-LoRA training steps of the ChatGLM-6B-shaped model in bf16 with remat on jax's device."""
    start = time.perf_counter()
    cgc = cgc_config()
    hf = {**GLM6B, "num_layers": num_layers}
    model = chatglm.build(chatglm.ChatGLMConfig.from_hf(hf), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                          lora=cgc, remat=True)
    batch = glm_batch(hf, batch_size, seq, cgc.num_tasks)
    abstract = jax.eval_shape(lambda k: model.init(k, batch["input_ids"], None, batch["task_ids"])["params"],
                              jax.random.key(0))
    base = random_base(split_params(abstract)[0])
    adapters = init_adapters(model, batch)
    jax.block_until_ready((base, adapters))
    base_params, adapter_params = count_parameters(base)[1], count_parameters(adapters)[0]
    init_s, start = time.perf_counter() - start, time.perf_counter()
    tx, schedule = make_optimizer(OPTIMIZER)
    state = TrainState.create(adapters, tx, seed=0)
    step = jax.jit(make_train_step(model, tx, schedule, cgc.num_tasks), donate_argnums=0)
    step = step.lower(state, base, batch).compile()
    memory = step.memory_analysis()  # XLA's own buffer plan: scratch beyond arguments and outputs
    temp_gib = None if memory is None else memory.temp_size_in_bytes / GIB
    compile_s, times, losses = time.perf_counter() - start, [], []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = jax.block_until_ready(step(state, base, batch))
        times.append(time.perf_counter() - start)
        losses.append(float(metrics["loss"]))
    step_s = float(np.median(times[1:] if len(times) > 1 else times))  # the first step may fault pages in
    return {"step_s": step_s, "step_times_s": times, "tokens_per_s": batch_size * seq / step_s, "init_s": init_s,
            "compile_s": compile_s, "xla_temp_gib": temp_gib, "losses": losses, "base_params": base_params,
            "adapter_params": adapter_params, "batch": batch_size, "seq": seq, "layers": num_layers,
            "device": str(jax.devices()[0])}


def model_flops_per_token(base_params: int, adapter_params: int, seq: int, num_layers: int) -> tuple[float, float]:
    """(F, F_6n): the module docstring's model FLOPs per token, and 6 N (N = all parameters)."""
    attention = 12 * num_layers * seq * GLM6B["hidden_size"]
    return 4 * base_params + 6 * adapter_params + attention, 6 * (base_params + adapter_params) + attention


def mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) / 1024**2


def bench_glm6b(args) -> dict:
    available = mem_available_gib()
    if available < 20 and not args.force:
        print(f"\n[glm6b] skipped: {available:.1f} GiB available < 20 GiB (the step peaks near 16 GiB); "
              "free memory or pass --force", file=sys.stderr)
        return {}
    cmd = [sys.executable, __file__, "--glm6b-child", "--glm6b-batch", str(args.glm6b_batch),
           "--glm6b-seq", str(args.glm6b_seq), "--glm6b-steps", str(args.glm6b_steps),
           "--glm6b-layers", str(args.glm6b_layers)]
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {LOW_MEMORY_CPU_SCHEDULE}".strip()}
    rc, out, peak = run_child_peak_rss(cmd, env)
    if rc != 0:
        print(f"\n[glm6b] child failed with exit code {rc} (killed for memory if -9); peak RSS {peak / GIB:.2f} GiB",
              file=sys.stderr)
        return {"glm6b_peak_rss_gb": peak / GIB}
    r = json.loads(out.strip().splitlines()[-1])
    print(f"\n[glm6b] ChatGLM-6B shape, random bf16 base ({r['base_params'] / 1e9:.2f} B), CGC-LoRA "
          f"({r['adapter_params'] / 1e6:.1f} M trainable), {r['layers']} blocks, remat, "
          f"{r['batch']} x {r['seq']} tokens on {r['device']}: "
          f"{r['step_s']:.1f} s/step ({r['tokens_per_s']:.1f} tokens/s), peak RSS {peak / GIB:.2f} GiB; "
          f"init {r['init_s']:.0f} s, compile {r['compile_s']:.0f} s, losses {r['losses']}")
    return {"glm6b_step_s": r["step_s"], "glm6b_peak_rss_gb": peak / GIB, "glm6b": r}


def bench_gpu(args) -> dict:
    if jax.devices()[0].platform != "gpu":
        raise SystemExit(f"--gpu needs a GPU; jax sees {jax.devices()}")
    r = glm6b_run(args.gpu_batch, args.gpu_seq, args.gpu_steps, args.glm6b_layers)
    flops, flops_6n = model_flops_per_token(r["base_params"], r["adapter_params"], args.gpu_seq, args.glm6b_layers)
    mfu, mfu_6n = r["tokens_per_s"] * flops / args.peak_flops, r["tokens_per_s"] * flops_6n / args.peak_flops
    print(f"\n[gpu] {r['device']}: {args.gpu_batch} x {args.gpu_seq} tokens, {r['step_s'] * 1e3:.1f} ms/step, "
          f"{r['tokens_per_s']:.0f} tokens/s; MFU {mfu:.3f} (F = 4 N_base + 6 N_adapt + 12 L S d = {flops:.3e} "
          f"FLOPs/token), {mfu_6n:.3f} by 6 N; peak {args.peak_flops:.3g} FLOP/s")
    return {"gpu_tokens_per_s": r["tokens_per_s"], "gpu_mfu": mfu, "gpu_mfu_6n": mfu_6n,
            "gpu_flops_per_token": flops, "gpu_step_s": r["step_s"], "gpu": r}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per variant (chatglm, llama)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (chatglm, llama)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence (chatglm)")
    parser.add_argument("--llama-seq", type=int, default=256, help="tokens per sequence (llama)")
    parser.add_argument("--torch-threads", type=int, default=2, help="torch.set_num_threads for PEFT")
    parser.add_argument("--parts", default="chatglm,llama,real",
                        help="comma-separated parts to run: chatglm, llama, real (SmolLM2-135M shapes), "
                             "real-rss (only the real part's peak-RSS children), host-memory")
    parser.add_argument("--skip-small", action="store_true", help="skip the chatglm, llama and real parts")
    parser.add_argument("--real-seq", type=int, default=256, help="tokens per sequence (real), loss on the 2nd half")
    parser.add_argument("--real-rounds", type=int, default=3, help="timed rounds per variant (real)")
    parser.add_argument("--peft-bf16", choices=("weights", "autocast"), default="weights",
                        help="PEFT's bf16 variant: bf16 base weights, or float32 weights under torch.autocast")
    parser.add_argument("--real-skip-rss", action="store_true", help="skip the real part's peak-RSS child")
    parser.add_argument("--real-rss-batch", type=int, default=16, help="rows of the peak-RSS step")
    parser.add_argument("--real-rss-source", type=int, default=256, help="prompt tokens per row of the RSS step")
    parser.add_argument("--real-rss-target", type=int, default=64, help="target tokens per row of the RSS step")
    parser.add_argument("--real-rss-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--real-rss-remat", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--host-memory-steps", type=int, default=4, help="steps per child (host-memory)")
    parser.add_argument("--host-memory-child", choices=("plain", "reuse"), help=argparse.SUPPRESS)
    parser.add_argument("--plain-malloc", action="store_true",
                        help="run the parts with glibc's default malloc settings (no reuse_freed_memory)")
    parser.add_argument("--glm6b", action="store_true", help="also run the ChatGLM-6B-shaped step (~20 GB RAM)")
    parser.add_argument("--force", action="store_true", help="run --glm6b even with < 20 GiB available")
    parser.add_argument("--glm6b-batch", type=int, default=1, help="sequences per 6B step")
    parser.add_argument("--glm6b-seq", type=int, default=256, help="tokens per sequence of the 6B step")
    parser.add_argument("--glm6b-steps", type=int, default=2, help="6B steps; the median after the first is reported")
    parser.add_argument("--glm6b-layers", type=int, default=GLM6B["num_layers"], help="blocks (fewer: a smoke run)")
    parser.add_argument("--glm6b-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gpu", action="store_true", help="only the 6B-shaped step on the GPU, with MFU")
    parser.add_argument("--gpu-batch", type=int, default=4, help="sequences per GPU step")
    parser.add_argument("--gpu-seq", type=int, default=1024, help="tokens per sequence on the GPU")
    parser.add_argument("--gpu-steps", type=int, default=6, help="GPU steps; the median after the first is reported")
    parser.add_argument("--peak-flops", type=float, default=989e12, help="peak bf16 FLOP/s (H100 SXM dense: 989e12)")
    args = parser.parse_args()
    if args.host_memory_child:
        if args.host_memory_child == "reuse":
            reuse_freed_memory()
        print(json.dumps(host_memory_run(args.host_memory_steps)))
        return
    if not args.plain_malloc:
        reuse_freed_memory()  # as the entry points do; before the backend starts
    if args.real_rss_child:
        print(json.dumps(real_rss_run(args.real_rss_batch, args.real_rss_source, args.real_rss_target, steps=2,
                                      remat=args.real_rss_remat)))
        return
    if args.glm6b_child:
        print(json.dumps(glm6b_run(args.glm6b_batch, args.glm6b_seq, args.glm6b_steps, args.glm6b_layers)))
        return

    figures = dict.fromkeys(("real_ours_over_peft_f32", "real_ours_over_peft_bf16", "real_bf16_over_f32",
                             "real_step_peak_rss_gb", "host_memory_speedup", "cgc_over_lora", "cgc_over_floor", "lora_over_floor", "ours_over_peft",
                             "glm6b_step_s", "glm6b_peak_rss_gb", "gpu_tokens_per_s", "gpu_mfu"))
    if args.gpu:
        figures.update(bench_gpu(args))
    else:
        if args.glm6b:  # first, so that the children's peak RSS is this child's
            figures.update(bench_glm6b(args))
        parts = set() if args.skip_small else set(args.parts.split(","))
        known = {"chatglm", "llama", "real", "real-rss", "host-memory"}
        if parts - known:
            parser.error(f"--parts {args.parts}: unknown {sorted(parts - known)}")
        if "host-memory" in parts:
            figures.update(bench_host_memory(args))
        if "real" in parts:
            figures.update(bench_real(args))
        elif "real-rss" in parts:  # the real part's peak-RSS children alone
            figures.update(real_peak_rss(args))
        if "chatglm" in parts:
            figures.update(bench_chatglm(args))
        if "llama" in parts:
            figures.update(bench_llama_vs_peft(args))
        if not args.glm6b:
            print(f"\n[glm6b] skipped: run `python {os.path.relpath(__file__)} --glm6b [--skip-small]` "
                  "with >= 20 GB of free RAM for the ChatGLM-6B-shaped step", file=sys.stderr)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
