"""Train CGC-LoRA adapters: `python train.py --config NAME [--config.a.b=value ...] [--workdir DIR]`.

Resumes from the latest checkpoint in the workdir by itself. See configs/ for the named configs
and README.md for what each run writes.
"""

import argparse
import sys

from cgc_lora_jax.config import available_configs, parse_args_with_config

AFTER_TRAIN = ("", "trained", "base_and_trained")  # eval.after_train: nothing, the run, the base and the run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help=f"config name: {', '.join(available_configs())}")
    parser.add_argument("--workdir", default=None, help="run folder (default: runs/CONFIG)")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation that eval.after_train asks for")
    args, cfg = parse_args_with_config(parser, argv)
    workdir = args.workdir or f"runs/{args.config}"
    if cfg.eval.after_train not in AFTER_TRAIN:
        parser.error(f"--config.eval.after_train={cfg.eval.after_train!r}: expected one of "
                     f"{', '.join(repr(a) for a in AFTER_TRAIN)}")

    from cgc_lora_jax.checkpoint import BaseMismatchError
    from cgc_lora_jax.data import DataError
    from cgc_lora_jax.trainer import NonFiniteLossError, train

    try:
        summary = train(cfg, workdir)
    except (FileNotFoundError, DataError, BaseMismatchError, NonFiniteLossError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)  # the user's input, not a bug: no traceback
        return 1
    print(f"trained {summary['step']} steps; adapters in {workdir}/adapters")
    if args.no_eval or not cfg.eval.after_train:
        return 0
    if cfg.eval.after_train == "base_and_trained":
        from cgc_lora_jax.demo.compare import compare_base_and_trained

        compare_base_and_trained(workdir, split=cfg.eval.split)
    else:
        from cgc_lora_jax.evaluate import evaluate_run

        evaluate_run(workdir, split=cfg.eval.split)
    return 0


if __name__ == "__main__":
    sys.exit(main())
