"""`python -m cgc_lora_jax export`: write a trained run's adapters as PEFT, merged HF or orbax folders."""

import argparse

from cgc_lora_jax import export as export_module


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=export_module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="training run folder (or an orbax export)")
    parser.add_argument("--task", required=True, help="task name, or 'all' (one folder per task)")
    parser.add_argument("--format", required=True, choices=export_module.FORMATS, help="peft | hf | orbax")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--base", default=None, help="the base's folder now (default: the recorded path)")
    args = parser.parse_args(argv)
    for folder in export_module.export(args.workdir, args.task, args.format, args.out, args.base):
        print(f"wrote {folder}")
    return 0

