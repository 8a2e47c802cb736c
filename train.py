"""Train CGC-LoRA adapters: see `python train.py --help` (cgc_lora_jax/cli/train.py)."""

import sys

from cgc_lora_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
