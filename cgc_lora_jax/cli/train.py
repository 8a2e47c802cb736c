"""Train CGC-LoRA adapters: `python train.py --config NAME [--config.a.b=value ...] [--workdir DIR]`
(= `python -m cgc_lora_jax train ...`).

Resumes from the latest checkpoint in the workdir by itself. See configs/ for the named configs
and README.md for what each run writes.
"""

import argparse
import os
import sys

from cgc_lora_jax.config import available_configs, parse_args_with_config
from cgc_lora_jax.host_memory import reuse_freed_memory


# XLA:CPU's default schedule favours concurrency: it runs the frozen weights' conversions for the
# backward early (their copies coexist, ~0.8 GiB per ChatGLM-6B block) and keeps every block's
# recomputed activations alive at once, so remat alone saves nothing there (bench/train_step.py
# --parts real-rss: 8.4 GiB of XLA temp for a SmolLM2 step at 16 x 320 tokens, 0.56 GiB with
# remat under this schedule).
LOW_MEMORY_CPU_SCHEDULE = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def xla_flags_for(cfg, flags: str) -> str:
    """XLA_FLAGS for a run: with model.remat, XLA:CPU's memory-minimising schedule is added (unless
    the user's flags already set that option)."""
    option = LOW_MEMORY_CPU_SCHEDULE.split("=")[0]
    if not cfg.model.remat or option in flags:
        return flags
    return f"{flags} {LOW_MEMORY_CPU_SCHEDULE}".strip()


def prepare_process(cfg) -> None:
    """What must precede JAX's backend: XLA_FLAGS (xla_flags_for) and, unless model.remat asks for
    the least memory, reusing freed host memory (cgc_lora_jax/host_memory.py: XLA:CPU's per-step
    buffers stop faulting in fresh pages; with remat glibc keeps returning freed blocks)."""
    os.environ["XLA_FLAGS"] = xla_flags_for(cfg, os.environ.get("XLA_FLAGS", ""))
    if not cfg.model.remat:
        reuse_freed_memory()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help=f"config name: {', '.join(available_configs())}")
    parser.add_argument("--workdir", default=None, help="run folder (default: runs/CONFIG)")
    parser.add_argument("--no-eval", action="store_true",
                        help="skip the evaluation that follows training when the config's eval.after_training is set")
    args, cfg = parse_args_with_config(parser, argv)
    workdir = args.workdir or f"runs/{args.config}"
    prepare_process(cfg)

    from cgc_lora_jax.data.records import DataError
    from cgc_lora_jax.run import BaseMismatchError
    from cgc_lora_jax.training.checkpoint_checks import CheckpointError
    from cgc_lora_jax.training.distributed import DistributedSetupError
    from cgc_lora_jax.training.loop import NonFiniteLossError, train

    try:
        summary = train(cfg, workdir)
    except (FileNotFoundError, DataError, BaseMismatchError, CheckpointError, NonFiniteLossError,
            DistributedSetupError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)  # the user's input, not a bug: no traceback
        return 1
    if summary.get("preempted"):
        from cgc_lora_jax.training.preemption import EXIT_STATUS

        print(f"train.py: stopped by SIGTERM after step {summary['step']}; its checkpoint is saved in "
              f"{workdir}/checkpoints: run the same command to resume", file=sys.stderr)
        return EXIT_STATUS
    print(f"trained {summary['step']} steps; adapters in {workdir}/adapters")
    import jax

    if jax.process_count() > 1:  # generation runs on one host: `python eval.py --workdir DIR` there
        return 0
    if not cfg.eval.after_training or args.no_eval:
        return 0
    if cfg.eval.get("compare_base", False):  # the base alone and the trained run, side by side
        from cgc_lora_jax.evaluation.compare import compare_base_and_trained

        compare_base_and_trained(workdir, split=cfg.eval.split)
    else:
        from cgc_lora_jax.evaluation.evaluate import evaluate_run

        evaluate_run(workdir, split=cfg.eval.split)
    return 0
