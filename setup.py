"""Packaging beyond pyproject.toml: the repository's models/ and configs/ install inside the
package, as cgc_lora_jax.models and cgc_lora_jax.configs, so site-packages gets no top-level
`models` or `configs`. (A discovered package list plus two mapped folders cannot be said in
pyproject.toml's static tables.)"""

from setuptools import find_packages, setup

MAPPED = {"cgc_lora_jax.models": "models", "cgc_lora_jax.configs": "configs"}

setup(
    packages=find_packages(include=["cgc_lora_jax", "cgc_lora_jax.*"]) + sorted(MAPPED),
    package_dir=MAPPED,
)
