"""The train command's process settings."""

import os

import pytest

from cgc_lora_jax.cli.train import LOW_MEMORY_CPU_SCHEDULE, xla_flags_for
from cgc_lora_jax.config import load_config


def test_remat_runs_under_the_low_memory_schedule_and_user_flags_are_kept():
    plain, remat = load_config("demo_tiny", []), load_config("demo_tiny", ["model.remat=true"])
    assert xla_flags_for(plain, "--xla_dump_to=/tmp/x") == "--xla_dump_to=/tmp/x"
    assert xla_flags_for(remat, "") == LOW_MEMORY_CPU_SCHEDULE
    assert xla_flags_for(remat, "--xla_dump_to=/tmp/x").split() == ["--xla_dump_to=/tmp/x", LOW_MEMORY_CPU_SCHEDULE]
    # the user's own choice of the option wins
    mine = "--xla_cpu_enable_concurrency_optimized_scheduler=true"
    assert xla_flags_for(remat, mine) == mine


@pytest.mark.parametrize("remat", [False, True])
def test_train_reuses_freed_memory_unless_remat_asks_for_the_least(monkeypatch, remat):
    import cgc_lora_jax.cli.train as train_cli

    calls = []
    monkeypatch.setattr(train_cli, "reuse_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    train_cli.prepare_process(load_config("demo_tiny", [f"model.remat={str(remat).lower()}"]))
    assert calls == ([] if remat else [1])
    assert os.environ["XLA_FLAGS"].startswith("--xla_dump_to=/tmp/x")
    assert (LOW_MEMORY_CPU_SCHEDULE in os.environ["XLA_FLAGS"]) is remat
