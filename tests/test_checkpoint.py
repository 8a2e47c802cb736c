"""cgc_lora_jax/training/checkpoint.py and the run folder's adapter files (run/adapters.py): orbax
round trips equal to what was saved, keep-last-k, and resuming against another base refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgc_lora_jax.run import BaseMismatchError, fingerprint_base, load_adapters, save_adapters
from cgc_lora_jax.training.checkpoint import RunCheckpoints, abstract_like

BASE = {"path": "builtin:test", "fingerprint": "f" * 64}


def state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"adapters": {"A": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}, "step": jnp.asarray(seed, jnp.int32)}


def test_save_restore_keeps_last_k_and_refuses_another_base(tmp_path):
    ckpt = RunCheckpoints(tmp_path, keep=2, base=BASE)
    assert ckpt.restore_latest(abstract_like(state(0))) is None
    for step in (1, 2, 3):
        ckpt.save(step, state(step), {"data": {"epoch": step}})
    ckpt.wait()
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2, 3]
    restored, meta = ckpt.restore_latest(abstract_like(state(0)))
    np.testing.assert_array_equal(restored["adapters"]["A"], state(3)["adapters"]["A"])
    assert int(restored["step"]) == 3 and meta["step"] == 3 and meta["data"] == {"epoch": 3} and meta["base"] == BASE
    ckpt.close()
    other = RunCheckpoints(tmp_path, keep=2, base={**BASE, "fingerprint": "0" * 64})
    with pytest.raises(BaseMismatchError, match="was trained on base"):
        other.restore_latest(abstract_like(state(0)))
    other.close()


def test_adapters_folder_round_trip(tmp_path):
    adapters = jax.device_get(state(7)["adapters"])
    save_adapters(tmp_path / "adapters", adapters, {"task_vocab": ["a"]})
    loaded, meta = load_adapters(tmp_path / "adapters")
    np.testing.assert_array_equal(loaded["A"], adapters["A"])
    assert meta == {"task_vocab": ["a"]}
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        load_adapters(tmp_path)


def test_fingerprint_follows_config_and_weight_bytes(tmp_path):
    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "model.safetensors").write_bytes(b"x" * 3000)
    (tmp_path / "notes.txt").write_text("ignored")
    first = fingerprint_base(tmp_path)
    (tmp_path / "notes.txt").write_text("changed")
    assert fingerprint_base(tmp_path) == first  # files that are not config, tokenizer or weights
    (tmp_path / "model.safetensors").write_bytes(b"x" * 2999 + b"y")
    assert fingerprint_base(tmp_path) != first
