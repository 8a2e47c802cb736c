"""cgc-lora-jax: multi-task parameter-efficient fine-tuning of LLMs with CGC-LoRA, in JAX/Flax."""

__version__ = "0.1.0"
