"""`python -m cgc_lora_jax clusters`: train one CGC-LoRA module set per task cluster (1+N), or answer
prompts with the trained clusters."""

import argparse
import os
from pathlib import Path

from cgc_lora_jax.multitask import clusters as clusters_module
from cgc_lora_jax.multitask.clusters import parse_clusters, train_clusters
from cgc_lora_jax.multitask.server import MultiTaskServer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=clusters_module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train_cmd = commands.add_parser("train", help="train one CGC-LoRA module set per cluster")
    train_cmd.add_argument("--config", required=True, help="config name (configs/NAME.py)")
    train_cmd.add_argument("--clusters", default=None,
                           help='"name1:TaskA,TaskB;name2:TaskC" (default: the config\'s data.clusters)')
    train_cmd.add_argument("--workdir", required=True, help="folder of the N cluster runs")
    gen_cmd = commands.add_parser("generate", help="answer prompts of one task with the trained clusters")
    gen_cmd.add_argument("--workdir", required=True)
    gen_cmd.add_argument("--task", required=True)
    gen_cmd.add_argument("--prompt", action="append", required=True, help="a prompt text (repeatable)")
    gen_cmd.add_argument("--max-new-tokens", type=int, default=64)
    args, overrides = parser.parse_known_args(argv)
    if args.command == "generate":
        if overrides:
            parser.error(f"unrecognized arguments: {' '.join(overrides)}")
        server = MultiTaskServer.from_workdir(args.workdir)
        for prompt, answer in zip(args.prompt, server.generate(args.task, args.prompt, max_new_tokens=args.max_new_tokens)):
            print(f"{prompt!r} -> {answer!r}")
        return 0
    from cgc_lora_jax.config import parse_args_with_config

    from cgc_lora_jax.cli.train import xla_flags_for

    args, cfg = parse_args_with_config(parser, argv)
    os.environ["XLA_FLAGS"] = xla_flags_for(cfg, os.environ.get("XLA_FLAGS", ""))  # as train.py does
    try:
        spec = args.clusters if args.clusters is not None else cfg.data.clusters
        if not spec:
            raise ValueError("no clusters: pass --clusters or set --config.data.clusters")
        clusters = parse_clusters(spec)
    except ValueError as e:
        parser.error(str(e))
    for name, summary in train_clusters(cfg, clusters, args.workdir).items():
        print(f"cluster {name}: {summary['step']} steps, adapters in {Path(args.workdir) / name / 'adapters'}")
    return 0

