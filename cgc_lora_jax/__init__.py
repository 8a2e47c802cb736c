"""cgc-lora-jax: multi-task parameter-efficient fine-tuning of LLMs with CGC-LoRA, in JAX/Flax.

The model families (`models/` in the repository) and the named configs (`configs/`) belong to
this package: they import as `cgc_lora_jax.models` and `cgc_lora_jax.configs`. A wheel carries
them inside the package (setup.py maps the folders); from a checkout (an editable install, or
PYTHONPATH set to the checkout) `_checkout` maps them to the repository's folders.
"""

from cgc_lora_jax import _checkout

__version__ = "0.1.0"

_checkout.map_repository_folders(__name__, __file__)
