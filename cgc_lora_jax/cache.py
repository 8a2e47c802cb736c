"""The project's cache folder: `$CGC_LORA_JAX_CACHE`, default ~/.cache/cgc-lora-jax/.

It holds the hub's bases (cgc_lora_jax/hub.py, with the parsed header of a GGUF beside it:
models/gguf.py) and XLA's compiled programs (training/loop.py `enable_compile_cache`).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("CGC_LORA_JAX_CACHE") or Path.home() / ".cache" / "cgc-lora-jax")
