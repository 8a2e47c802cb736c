"""Test set-up: 8 fake CPU devices, set before jax is imported anywhere; shared test helpers.

Tests that read ../shared (the reference fixtures beside the checkout) skip themselves, with
the reason, when it is absent. Helpers used by several test modules live here
(`from conftest import rel_err, CHATGLM_FIXTURES`).
"""

import os
from pathlib import Path

import numpy as np

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

SHARED = Path(__file__).resolve().parents[1].parent / "shared"  # read-only references beside the checkout
CHATGLM_FIXTURES = SHARED / "fixtures" / "chatglm"  # tiny ChatGLM checkpoints + original outputs
PROMPTCBLUE_DATA = SHARED / "data" / "promptcblue"  # official PromptCBLUE samples + SCORING.md


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|, in float64: the parity measure of every model test."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
