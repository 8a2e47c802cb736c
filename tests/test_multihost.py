"""Multi-host training for real: 2 `train.py` processes x 4 CPU devices, joined by jax.distributed
on localhost (gloo collectives), against the same run in 1 process x 8 devices.

The reference is the one-process run of the same config on the same (2, 2, 2) mesh; losses must
agree to rtol 1e-5 (only the collectives' summation order differs). Checkpoints written by the two
hosts together must resume on one host with identical losses, and the reverse.
"""

import shutil
import signal
import time
from collections import Counter

import jax
import numpy as np
import pytest

from cgc_lora_jax.data.batching import make_batch
from cgc_lora_jax.run import load_adapters
from cgc_lora_jax.config import load_config
from cgc_lora_jax.training.distributed import DistributedSetupError, host_rows, initialize_from_env
from cgc_lora_jax.data.formatting import EncodedSplit
from cgc_lora_jax.training.preemption import EXIT_STATUS
from cgc_lora_jax.sharding import make_mesh
from cgc_lora_jax.training.loop import train
from train_runs import FAST, MESH_8, checkpoint_steps, free_port, losses, run_hosts, start


def assert_same_losses(run, reference, steps):
    run, reference = losses(run), losses(reference)
    assert sorted(run) == list(steps), run
    np.testing.assert_allclose([run[s] for s in steps], [reference[s] for s in steps], rtol=1e-5)


def drop_after(workdir, step):
    """The workdir as a run killed just after checkpoint `step` left it."""
    for later in checkpoint_steps(workdir):
        if later > step:
            shutil.rmtree(workdir / "checkpoints" / str(later))
    shutil.rmtree(workdir / "adapters")


def test_two_hosts_equal_one_host_and_resume_on_one(tmp_path):
    overrides = [*FAST, *MESH_8, "train.steps=3", "train.checkpoint_every=2"]
    train(load_config("demo_tiny", overrides), tmp_path / "one")  # this process: 8 devices
    run_hosts(tmp_path / "two", overrides)
    assert_same_losses(tmp_path / "two", tmp_path / "one", range(1, 4))

    # One checkpoint per step, written by both hosts together: each its own shard index, one meta.
    assert checkpoint_steps(tmp_path / "two") == [2, 3]
    state = tmp_path / "two" / "checkpoints" / "3" / "state"
    assert (state / "ocdbt.process_0").is_dir() and (state / "ocdbt.process_1").is_dir()
    assert not list((tmp_path / "two" / "checkpoints").glob("*tmp*")), "no half-written checkpoint is left"
    two, meta = load_adapters(tmp_path / "two" / "adapters")
    one, _ = load_adapters(tmp_path / "one" / "adapters")
    assert meta["step"] == 3
    # Adam divides by sqrt(v): where a gradient is ~0, a 1e-9 difference in summation order
    # becomes a visible update, so compare to a small fraction (5e-4) of one step's size (lr).
    np.testing.assert_allclose(np.concatenate([np.ravel(x) for x in jax.tree.leaves(two)]),
                               np.concatenate([np.ravel(x) for x in jax.tree.leaves(one)]), rtol=1e-5, atol=1e-5)

    # The two hosts' checkpoint 2 resumes here, on 1 process x 8 devices, to the same losses.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two", resumed)
    drop_after(resumed, 2)
    train(load_config("demo_tiny", overrides), resumed)
    assert_same_losses(resumed, tmp_path / "one", range(1, 4))


@pytest.mark.slow
def test_one_host_checkpoint_resumes_on_two_hosts(tmp_path):
    overrides = [*FAST, *MESH_8, "train.steps=8", "train.checkpoint_every=4"]
    train(load_config("demo_tiny", overrides), tmp_path / "one")
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "one", resumed)
    drop_after(resumed, 4)
    run_hosts(resumed, overrides)
    assert_same_losses(resumed, tmp_path / "one", range(1, 9))
    assert checkpoint_steps(resumed) == [4, 8]


def test_a_hosts_rows_are_its_share_of_the_global_batch():
    lengths = [3, 7, 5, 2, 6, 4, 1, 8]
    ids = [np.arange(1, n + 1, dtype=np.int32) for n in lengths]
    split = EncodedSplit(ids, ids, np.arange(8) % 3, [str(i) for i in range(8)], 0, Counter())
    indices = np.array([4, 1, -1, 6, 0, 7, 2, -1])
    whole = make_batch(split, indices, pad_multiple=4)
    share = make_batch(split, indices, pad_multiple=4, rows=np.array([2, 3, 4, 5]))
    for name in ("input_ids", "labels", "attention_mask", "task_ids", "sample_index"):
        np.testing.assert_array_equal(getattr(share, name), getattr(whole, name)[2:6], err_msg=name)
    assert share.padding_fraction == whole.padding_fraction  # the whole batch's, on every host
    assert share.input_ids.shape[1] == 8  # the whole batch's longest row (8), not this share's
    # One process holds every row, whatever the mesh.
    np.testing.assert_array_equal(host_rows(make_mesh({"data": 4, "fsdp": 2}), 16), np.arange(16))


def test_a_half_described_cluster_is_a_named_error():
    assert initialize_from_env({}) is False  # one host: nothing to join
    with pytest.raises(DistributedSetupError, match="JAX_NUM_PROCESSES, JAX_PROCESS_ID"):
        initialize_from_env({"JAX_COORDINATOR_ADDRESS": "localhost:1234"})
    with pytest.raises(DistributedSetupError, match=r"JAX_PROCESS_ID=2 is not in \[0, JAX_NUM_PROCESSES=2\)"):
        initialize_from_env({"JAX_COORDINATOR_ADDRESS": "localhost:1234", "JAX_NUM_PROCESSES": "2",
                             "JAX_PROCESS_ID": "2"})


@pytest.mark.slow
def test_sigterm_to_one_host_stops_every_host_at_one_saved_step(tmp_path):
    """The cluster signals host 0 only: JAX's preemption service makes both hosts save the same
    step together and exit with 143."""
    overrides = [*FAST, *MESH_8, "train.steps=40", "train.checkpoint_every=100"]
    cluster = {"JAX_COORDINATOR_ADDRESS": f"localhost:{free_port()}", "JAX_NUM_PROCESSES": "2"}
    hosts = [start(tmp_path / "run", overrides, 4, tmp_path / f"host{i}.log", JAX_PROCESS_ID=str(i), **cluster)
             for i in range(2)]
    deadline = time.time() + 600
    while max(losses(tmp_path / "run"), default=0) < 2 if (tmp_path / "run" / "metrics.jsonl").exists() else True:
        assert all(h.poll() is None for h in hosts) and time.time() < deadline, "the hosts did not reach step 2"
        time.sleep(0.05)
    hosts[0].send_signal(signal.SIGTERM)
    assert [h.wait(timeout=300) for h in hosts] == [EXIT_STATUS, EXIT_STATUS]
    stopped = max(losses(tmp_path / "run"))
    assert checkpoint_steps(tmp_path / "run") == [stopped] and stopped < 40
    for i in range(2):
        assert f"stopped by SIGTERM after step {stopped}" in (tmp_path / f"host{i}.log").read_text()
