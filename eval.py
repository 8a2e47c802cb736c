"""Evaluate runs and baselines, score prediction files, compare runs: see `python eval.py --help` (cgc_lora_jax/cli/eval.py)."""

import sys

from cgc_lora_jax.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
