"""Every command-line entry point, one module per command:

    python -m cgc_lora_jax train    --config NAME [--workdir DIR] [--config.a.b=value ...]   (= python train.py)
    python -m cgc_lora_jax eval     --workdir DIR | score | compare | lorahub | icl          (= python eval.py)
    python -m cgc_lora_jax export   --workdir DIR --task T|all --format peft|hf|orbax --out DIR
    python -m cgc_lora_jax affinity --config NAME --k K [--steps S]
    python -m cgc_lora_jax clusters train|generate ...

Each command module has `main(argv) -> exit status`; the library modules hold no argument
parsing. A command module is imported only when its command runs, so `--help` stays fast.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {  # command -> module with main(argv)
    "train": "cgc_lora_jax.cli.train",
    "eval": "cgc_lora_jax.cli.eval",
    "export": "cgc_lora_jax.cli.export",
    "affinity": "cgc_lora_jax.cli.affinity",
    "clusters": "cgc_lora_jax.cli.clusters",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"cgc_lora_jax: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    sys.argv[0] = f"python -m cgc_lora_jax {command}"  # argparse's usage line names the command
    return importlib.import_module(COMMANDS[command]).main(rest)
