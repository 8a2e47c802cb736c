"""Flax model families with their Hugging Face converters and partition rules."""
