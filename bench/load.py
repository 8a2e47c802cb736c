"""Load time and peak RSS of `load_pretrained` on a ChatGLM-6B-shaped bf16 safetensors checkpoint.

The bench writes a random checkpoint with ChatGLM-6B's tensor names and shapes (hidden 4096,
28 layers, inner 16384, vocab 130528: 6.7e9 values, 13.4 GB in bf16, including the stored
lm_head.weight and rotary inv_freq buffers) tensor by tensor, in ~2 GB shards with
model.safetensors.index.json, to a temporary folder. A child process then loads it in bf16
and reports its peak resident set (VmHWM); the folder is deleted afterwards. The target is
peak RSS <= 1.3 x the checkpoint size (reading tensor by tensor, so the parameters exist once).
The page cache is warm (the file was just written), so the time measures the loader, not the disk.

    python bench/load.py                           # full size (needs ~14 GB disk and RAM)
    python bench/load.py --layers 2 --vocab 8192   # smoke run, ~0.5 GB

Prints a table, then one JSON line with load_peak_rss_over_size and load_seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python bench/load.py` from a checkout, without installing

from cgc_lora_jax.models.weight_writer import TensorSpec, parse_size, write_folder  # noqa: E402


def chatglm6b_config(layers: int, vocab: int) -> dict:
    """ChatGLM-6B's config.json (its real keys and token ids), with the sizes of this run."""
    return {
        "_name_or_path": "THUDM/chatglm-6b", "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                     "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        "bos_token_id": 130004, "eos_token_id": 130005, "mask_token_id": 130000, "gmask_token_id": 130001,
        "pad_token_id": 3, "hidden_size": 4096, "inner_hidden_size": 16384, "layernorm_epsilon": 1e-05,
        "max_sequence_length": 2048, "model_type": "chatglm", "num_attention_heads": 32,
        "num_layers": layers, "position_encoding_2d": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.23.1", "use_cache": True, "vocab_size": vocab,
    }  # fmt: skip


def chatglm6b_tensors(layers: int, vocab: int, seed: int = 0) -> list[TensorSpec]:
    """ChatGLM-6B's stored tensors in file order; each is generated only when written."""
    hidden, inner = 4096, 16384
    shapes = {"transformer.word_embeddings.weight": (vocab, hidden)}
    for i in range(layers):
        hf = f"transformer.layers.{i}."
        shapes |= {
            hf + "input_layernorm.weight": (hidden,), hf + "input_layernorm.bias": (hidden,),
            hf + "attention.rotary_emb.inv_freq": (32,),
            hf + "attention.query_key_value.weight": (3 * hidden, hidden),
            hf + "attention.query_key_value.bias": (3 * hidden,),
            hf + "attention.dense.weight": (hidden, hidden), hf + "attention.dense.bias": (hidden,),
            hf + "post_attention_layernorm.weight": (hidden,),
            hf + "post_attention_layernorm.bias": (hidden,),
            hf + "mlp.dense_h_to_4h.weight": (inner, hidden), hf + "mlp.dense_h_to_4h.bias": (inner,),
            hf + "mlp.dense_4h_to_h.weight": (hidden, inner), hf + "mlp.dense_4h_to_h.bias": (hidden,),
        }  # fmt: skip
    shapes |= {"transformer.final_layernorm.weight": (hidden,), "transformer.final_layernorm.bias": (hidden,),
               "lm_head.weight": (vocab, hidden)}  # fmt: skip

    def random_bf16(shape, index):
        # Random sign and mantissa, exponent fixed at 2^-7: finite values without a float32 pass.
        bits = np.random.default_rng([seed, index]).integers(0, 1 << 16, size=shape, dtype=np.uint16)
        bits &= 0x807F
        bits |= 0x78 << 7
        return bits.view(ml_dtypes.bfloat16)

    bf16 = np.dtype(ml_dtypes.bfloat16)
    return [
        TensorSpec(name, shape, bf16, lambda shape=shape, i=i: random_bf16(shape, i))
        for i, (name, shape) in enumerate(shapes.items())
    ]


def measure_in_child(folder: Path) -> dict:
    """Run the load in a fresh process, so its peak RSS is the load's alone."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(folder)], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"the loading child failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_rss() -> int:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that across
    fork + exec, so a child would start at its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux


def child(folder: str) -> None:
    import jax
    import jax.numpy as jnp

    from cgc_lora_jax.models.hf_io import load_pretrained

    jax.devices()  # start the backend before the baseline
    baseline = peak_rss()
    start = time.perf_counter()
    _, params = load_pretrained(folder, jnp.bfloat16)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    peak = peak_rss()
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak, "baseline_rss_bytes": baseline,
                      "param_bytes": param_bytes}))  # fmt: skip


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=28, help="GLM blocks (28 = ChatGLM-6B)")
    parser.add_argument("--vocab", type=int, default=130528, help="vocabulary rows (130528 = ChatGLM-6B)")
    parser.add_argument("--shard-size", default="2GB", help="max bytes per safetensors shard")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the temporary checkpoint goes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child)

    tensors = chatglm6b_tensors(args.layers, args.vocab)
    size = sum(t.nbytes for t in tensors)
    free_disk, free_ram = shutil.disk_usage(args.dir).free, available_memory()
    if free_disk < 1.1 * size:
        sys.exit(f"{args.dir} has {free_disk / 1e9:.1f} GB free; the checkpoint needs {size / 1e9:.1f} GB")
    if free_ram < 1.05 * size + 1e9:  # the load holds the parameters once, plus a tensor or two
        sys.exit(f"{free_ram / 1e9:.1f} GB RAM available; loading {size / 1e9:.1f} GB needs more")

    folder = Path(tempfile.mkdtemp(prefix="bench-load-", dir=args.dir)) / "chatglm-6b"
    try:
        start = time.perf_counter()
        write_folder(folder, tensors, chatglm6b_config(args.layers, args.vocab), parse_size(args.shard_size))
        write_seconds = time.perf_counter() - start
        shards = len(list(folder.glob("*.safetensors")))
        figures = measure_in_child(folder)
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)

    peak, baseline = figures["peak_rss_bytes"], figures["baseline_rss_bytes"]
    rows = [
        ("checkpoint (bf16 safetensors)", f"{size / 1e9:.2f} GB in {shards} shards, {len(tensors)} tensors"),
        ("loaded parameters", f"{figures['param_bytes'] / 1e9:.2f} GB (lm_head is tied, not loaded)"),
        ("write (tensor by tensor, fsync)", f"{write_seconds:.1f} s"),
        ("load_pretrained (warm page cache)",
         f"{figures['seconds']:.1f} s, {size / 1e9 / figures['seconds']:.2f} GB/s"),
        ("RSS after imports (baseline)", f"{baseline / 1e9:.2f} GB"),
        ("peak RSS of the load", f"{peak / 1e9:.2f} GB"),
        ("peak RSS / checkpoint size", f"{peak / size:.3f} (target <= 1.3)"),
        ("(peak - baseline) / size", f"{(peak - baseline) / size:.3f}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    summary = {
        "load_peak_rss_over_size": round(peak / size, 4), "load_seconds": round(figures["seconds"], 2),
        "checkpoint_bytes": size, "peak_rss_bytes": peak, "layers": args.layers, "vocab": args.vocab,
    }  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
