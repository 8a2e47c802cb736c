"""`python -m cgc_lora_jax affinity`: inter-task affinity of a short warm-up, and the best grouping into K clusters."""

import argparse
import json
from pathlib import Path

from cgc_lora_jax.multitask import affinity as affinity_module
from cgc_lora_jax.multitask.affinity import (best_partition, format_matrix, labels_of, partition_score, run_affinity,
                                             save_heatmap)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=affinity_module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config name (configs/NAME.py)")
    parser.add_argument("--k", type=int, required=True, help="number of clusters")
    parser.add_argument("--steps", type=int, default=10, help="warm-up steps (affinity averaged over them)")
    parser.add_argument("--batch-per-task", type=int, default=8, help="samples of each task per step")
    parser.add_argument("--lookahead", default="adam", choices=("adam", "sgd"), help="the lookahead step's optimizer")
    parser.add_argument("--lookahead-lr", type=float, default=None, help="its learning rate (default: train.lr)")
    parser.add_argument("--workdir", default=None, help="output folder (default: runs/CONFIG-affinity)")
    from cgc_lora_jax.multitask.clusters import format_clusters
    from cgc_lora_jax.config import parse_args_with_config

    args, cfg = parse_args_with_config(parser, argv)
    workdir = Path(args.workdir or f"runs/{args.config}-affinity")
    affinity, tasks = run_affinity(cfg, workdir, args.steps, args.batch_per_task, args.lookahead, args.lookahead_lr)
    groups = best_partition(affinity, args.k)
    clusters = {f"cluster{c}": [tasks[i] for i in group] for c, group in enumerate(groups)}
    (workdir / "affinity.json").write_text(json.dumps(
        {"tasks": tasks, "affinity": affinity.tolist(), "steps": args.steps, "lookahead": args.lookahead,
         "k": args.k, "clusters": clusters},
        indent=2, ensure_ascii=False) + "\n")
    heatmap = save_heatmap(affinity, tasks, workdir / "affinity.png")
    print(f"lookahead affinity Z(i -> j) over {args.steps} warm-up steps (row: step on task i; column: loss of task j)")
    print(format_matrix(affinity, tasks))
    print(f"heatmap: {heatmap}")
    score = partition_score(affinity, labels_of(groups, len(tasks)))
    snippet = format_clusters(clusters)
    print(f"best grouping into {args.k} clusters (total within-cluster affinity {score:.4f}):")
    print(f'  c.data.clusters = "{snippet}"')
    print(f'  python -m cgc_lora_jax clusters train --config {args.config} --clusters "{snippet}" '
          f"--workdir runs/{args.config}-1n")
    return 0

