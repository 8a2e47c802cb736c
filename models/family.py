"""The model families this package knows, and the checks that tie a CGC-LoRA config to one.

`FAMILIES` is built from an explicit list of the family modules' `ModelFamily` values (what a
family provides: models/family_spec.py); `detect_family` picks the one a config.json describes.

    family = detect_family(json.load(open("ckpt/config.json")))   # FAMILIES["chatglm2"], ...
    model = family.build(family.config_from_hf(hf), dtype=jnp.bfloat16, lora=with_default_targets(family, lora))
"""

from __future__ import annotations

import dataclasses
import re

from cgc_lora_jax.models import chatglm, chatglm2, llama
from cgc_lora_jax.models.family_spec import KeyMap, ModelFamily

__all__ = ["FAMILIES", "KeyMap", "ModelFamily", "check_lora_targets", "detect_family", "with_default_targets"]

FAMILIES: dict[str, ModelFamily] = {
    family.name: family for family in (chatglm.FAMILY, chatglm2.FAMILY, llama.LLAMA, llama.QWEN2)
}


def detect_family(hf_config: dict, source: str = "config.json") -> ModelFamily:
    """The one family in `FAMILIES` whose `matches` accepts this config.json dict."""
    found = [f for f in FAMILIES.values() if f.matches(hf_config)]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(f.name for f in found)})"
        raise ValueError(
            f"{source}: {what} model family matches model_type={hf_config.get('model_type')!r}, "
            f"architectures={hf_config.get('architectures')!r}; known: {sorted(FAMILIES)}"
        )
    return found[0]


def with_default_targets(family: ModelFamily, lora):
    """`lora` (a CGCLoRAConfig or None) with targets "" replaced by the family's default."""
    if lora is None or lora.targets:
        return lora
    return dataclasses.replace(lora, targets=family.default_lora_targets)


def check_lora_targets(family: ModelFamily, lora, param_paths) -> None:
    """An error when `lora.targets` adapts no layer, listing the layer paths it could match.

    param_paths: the model's flat parameter paths (tuples), adapters included.
    """
    if lora is None or any("lora" in path[:-1] for path in param_paths):
        return
    layers = dict.fromkeys(re.sub(r"layers_\d+", "layers_N", "/".join(path[:-1]))
                           for path in param_paths if path[-1] == "kernel")
    raise ValueError(
        f"lora.targets={lora.targets!r} matches no layer of the {family.name} model; it is searched in "
        f"these layer paths (N = block index): {', '.join(layers)}; the family's default (lora.targets=\"\") "
        f"is {family.default_lora_targets!r}")
