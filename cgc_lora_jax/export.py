"""Export a trained run: per task as a PEFT LoRA adapter or a merged HF checkpoint, or all tasks
as a standalone orbax adapter set.

Task t's update of an adapted layer is the rank r' = N_c * r_c + r_s product (merge.py)

    Delta W_t = A'_t B'_t,    A'_t [d_in, r'],  B'_t [r', d_out]  (gate weights and alpha / r folded in)

  peft   torch Linear computes x W^T, and PEFT adds scaling * lora_B(lora_A(x)) with scaling =
         lora_alpha / r, so the adapter stores lora_A.weight = A'^T [r', d_in], lora_B.weight =
         B'^T [d_out, r'] with r = lora_alpha = r' (scaling 1) under
         "base_model.model.<HF module>.lora_{A,B}.weight". The HF module of an adapted Flax layer
         comes from inverting the family's key map ("<HF module>.weight" -> (<layer>/kernel, True)).
  hf     W0 + Delta W_t folded into the kernels (merge_task) and saved under the original HF names
         (save_pretrained), with the base folder's tokenizer and code files copied beside them.
  orbax  the adapters and gate of every task (run.save_adapters) and meta.json (CGC-LoRA
         config, task vocabulary, base path and fingerprint, dtype): `load_exported_adapters`
         restores them onto a freshly loaded base, without any training state.

    python -m cgc_lora_jax export --workdir runs/demo --task all --format peft --out exports/peft
    model, params, vocab = load_exported_adapters("exports/orbax", "checkpoints/chatglm-6b")
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np

from cgc_lora_jax.merge import merge_task, task_lora_factors
from cgc_lora_jax.params import split_params
from cgc_lora_jax.run import BUILTIN_PREFIX, AdapterSet, BaseModel, load_adapter_set, save_adapters

FORMATS = ("peft", "hf", "orbax")
ADAPTER_SET_FORMAT = "cgc-lora-jax adapter set"
# Files of a base folder that an HF export copies (tokenizer, generation config, ChatGLM's code),
# and those it must not (the base's own config and weights index: the export writes its own).
_BASE_EXTRAS = re.compile(r".*\.(json|model|py|txt|tiktoken|jinja)")
_BASE_OWN = re.compile(r"config\.json|.*\.index\.json")


def load_exported_adapters(folder: str | Path, base_path: str | None = None):
    """(model, params, vocab) from an orbax export and the base at `base_path`."""
    adapter_set = load_adapter_set(folder, base_path)
    return adapter_set.base.model, adapter_set.params, adapter_set.vocab


def _family_and_config(base: BaseModel):
    from cgc_lora_jax.models.family import FAMILIES

    return FAMILIES[base.family], base.model.config


def hf_module_names(base: BaseModel) -> dict[str, str]:
    """{Flax layer path "a/b/q_proj": HF module name "a.b.q_proj"} of every Linear in the key map."""
    family, config = _family_and_config(base)
    names = {}
    for hf_key, (flax_path, transpose) in family.key_map(config).items():
        if transpose and flax_path[-1] == "kernel" and hf_key.endswith(".weight"):
            names["/".join(flax_path[:-1])] = hf_key[: -len(".weight")]
    return names


def peft_target_modules(adapted: list[str], base: BaseModel) -> list[str]:
    """PEFT target_modules: a short name ("q_proj") where every HF module of that name is
    adapted, else the full module names (PEFT matches `name == t or name.endswith("." + t)`)."""
    family, config = _family_and_config(base)
    modules = {k.rsplit(".", 1)[0] for k in family.key_map(config) if "." in k}
    chosen = set()
    for name in adapted:
        short = name.rsplit(".", 1)[-1]
        same_suffix = {m for m in modules if m == short or m.endswith("." + short)}
        chosen.add(short if same_suffix <= set(adapted) else name)
    return sorted(chosen)


def export_peft(adapter_set: AdapterSet, task: str, out: str | Path) -> Path:
    """Task `task` as a PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors)."""
    from safetensors.numpy import save_file

    factors = task_lora_factors(adapter_set.params, adapter_set.vocab.id(task), adapter_set.lora)
    if not factors:
        raise ValueError("the model has no adapted layer: nothing to export")
    names = hf_module_names(adapter_set.base)
    missing = sorted(set(factors) - set(names))
    if missing:
        raise ValueError(f"adapted layers {missing[:3]} have no HF Linear module in the "
                         f"{adapter_set.base.family} key map, so PEFT cannot hold them")
    tensors = {}
    for path, (a_ir, b_ro) in factors.items():
        prefix = f"base_model.model.{names[path]}"
        tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(np.asarray(a_ir, np.float32).T)  # [r', d_in]
        tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(np.asarray(b_ro, np.float32).T)  # [d_out, r']
    rank = adapter_set.lora.task_rank
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": adapter_set.meta["base"]["path"],
        "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": peft_target_modules([names[p] for p in factors], adapter_set.base),
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "revision": None, "auto_mapping": None,
    }  # fmt: skip
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def export_hf(adapter_set: AdapterSet, task: str, out: str | Path) -> Path:
    """Task `task` merged into the base weights, as an HF folder loadable without adapters."""
    from cgc_lora_jax.models.hf_io import save_pretrained

    merged = merge_task(adapter_set.params, adapter_set.vocab.id(task), adapter_set.lora)
    out = save_pretrained(adapter_set.base.model, jax.device_get(merged), out)
    base_path = adapter_set.meta["base"]["path"]
    if base_path.startswith(BUILTIN_PREFIX):
        if hasattr(adapter_set.base.tokenizer, "save"):
            adapter_set.base.tokenizer.save(out)
    else:  # tokenizer files, generation config, ChatGLM's remote code
        for file in Path(base_path).iterdir():
            if file.is_file() and _BASE_EXTRAS.fullmatch(file.name) and not _BASE_OWN.fullmatch(file.name):
                shutil.copy2(file, out / file.name)
    return out


def export_orbax(adapter_set: AdapterSet, out: str | Path) -> Path:
    """Every task's adapters and the gate, with what `load_exported_adapters` needs."""
    _, adapters = split_params(adapter_set.params)
    meta = {
        "format": ADAPTER_SET_FORMAT, "lora": dataclasses.asdict(adapter_set.lora),
        "task_vocab": list(adapter_set.vocab.tasks), "family": adapter_set.base.family,
        "base": dict(adapter_set.meta["base"]), "model": {"dtype": adapter_set.dtype},
        "step": adapter_set.meta.get("step"), "config": adapter_set.meta.get("config"),
    }  # fmt: skip
    return save_adapters(out, jax.device_get(adapters), meta)


def export(workdir: str | Path, task: str, fmt: str, out: str | Path, base_path: str | None = None) -> list[Path]:
    """Export `task` (or "all") of the run in `workdir` as `fmt`; returns the folders written.

    peft / hf with task "all" write out/<task>/ per task; orbax always holds every task.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: expected one of {FORMATS}")
    adapter_set = load_adapter_set(workdir, base_path)
    if task != "all":
        adapter_set.vocab.id(task)  # KeyError listing the tasks
    if fmt == "orbax":
        return [export_orbax(adapter_set, out)]
    write = export_peft if fmt == "peft" else export_hf
    if task != "all":
        return [write(adapter_set, task, out)]
    return [write(adapter_set, name, Path(out) / name) for name in adapter_set.vocab.tasks]
