"""Train CGC-LoRA adapters: `python train.py --config NAME [--config.a.b=value ...] [--workdir DIR]`.

Resumes from the latest checkpoint in the workdir by itself. See configs/ for the named configs
and README.md for what each run writes.
"""

import argparse
import sys

from cgc_lora_jax.config import ConfigError, available_configs, load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help=f"config name: {', '.join(available_configs())}")
    parser.add_argument("--workdir", default=None, help="run folder (default: runs/CONFIG)")
    parser.add_argument("--no-eval", action="store_true", help="skip the per-task evaluation after training")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides look like --config.train.steps=100)")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        parser.error(str(e))
    workdir = args.workdir or f"runs/{args.config}"

    from cgc_lora_jax.trainer import train

    summary = train(cfg, workdir)
    print(f"trained {summary['step']} steps; adapters in {workdir}/adapters")
    if not args.no_eval and cfg.data.format == "demo":
        from cgc_lora_jax.evaluate import evaluate_run

        evaluate_run(workdir, split=cfg.eval.split)
    return 0


if __name__ == "__main__":
    sys.exit(main())
