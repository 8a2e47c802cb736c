"""`python -m cgc_lora_jax COMMAND ...`: see cgc_lora_jax/cli/__init__.py for the commands."""

import sys

from cgc_lora_jax.cli import main

sys.exit(main())
