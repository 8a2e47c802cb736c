"""Multi-host runs: joining the JAX cluster, each host's rows of a global batch, who writes files.

Every host runs the same command; `initialize_from_env()` joins them into one JAX cluster before
anything touches a device, and the mesh then spans every host's devices (jax.devices() is ordered
host by host). How the data is split across hosts:

  - every host reads and tokenizes the whole split (text is small next to a model) and computes
    the same epoch plan from (seed, epoch), so all hosts agree on the B sample indices of each
    global batch and on its padded width T (the longest row of the whole batch);
  - a host builds only the rows its own devices hold under the batch sharding (`host_rows`):
    with the batch axis over data x fsdp laid across H hosts, host h holds rows
    [h B / H, (h + 1) B / H); a mesh that replicates the batch over hosts gives each all B rows;
  - `global_batch` assembles the hosts' rows into one global array
    (jax.make_array_from_process_local_data): no host ever holds another host's rows.

Files in the workdir (config, task vocabulary, logs, demo data) are written by host 0 only
(`is_primary`), with a `barrier` before anyone reads them; orbax checkpoints are written by all
hosts together (each its own shards, host 0 the metadata) into the same, shared, workdir.

    initialize_from_env()                              # no-op on one host
    rows = host_rows(mesh, batch_size)                 # global row numbers built here
    arrays = global_batch(batch.arrays(), mesh, batch_size)
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from cgc_lora_jax.sharding import BATCH_SPEC

# Set by the user's launcher; JAX itself reads only JAX_COORDINATOR_ADDRESS.
EXPLICIT_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# "1": let jax.distributed.initialize() detect the cluster itself (TPU pod, Open MPI, Kubernetes).
AUTO_VAR = "CGC_LORA_DISTRIBUTED"


class DistributedSetupError(RuntimeError):
    pass


def initialize_from_env(environ=None) -> bool:
    """Join the cluster the environment describes; False (nothing done) for a one-host run.

    JAX_COORDINATOR_ADDRESS=host:port with JAX_NUM_PROCESSES and JAX_PROCESS_ID: an explicit
    cluster. A SLURM step with more than one task (srun): JAX reads SLURM's variables.
    CGC_LORA_DISTRIBUTED=1: JAX's own detection (TPU pods, Open MPI, Kubernetes).
    """
    env = os.environ if environ is None else environ
    if jax.distributed.is_initialized():
        return True
    if "JAX_COORDINATOR_ADDRESS" in env:
        missing = [v for v in EXPLICIT_VARS if not env.get(v)]
        if missing:
            raise DistributedSetupError(f"JAX_COORDINATOR_ADDRESS is set but {', '.join(missing)} "
                                        f"is not: set all of {', '.join(EXPLICIT_VARS)} on every host")
        try:
            count, index = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
        except ValueError:
            raise DistributedSetupError(f"JAX_NUM_PROCESSES={env['JAX_NUM_PROCESSES']!r} and JAX_PROCESS_ID="
                                        f"{env['JAX_PROCESS_ID']!r} must be integers") from None
        if not 0 <= index < count:
            raise DistributedSetupError(f"JAX_PROCESS_ID={index} is not in [0, JAX_NUM_PROCESSES={count})")
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], num_processes=count, process_id=index)
        return True
    slurm_tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
    if env.get(AUTO_VAR) == "1" or ("SLURM_PROCID" in env and slurm_tasks.isdigit() and int(slurm_tasks) > 1):
        jax.distributed.initialize()
        return True
    return False


def is_primary() -> bool:
    """True on the host that writes the workdir's files (host 0; the only host of a one-host run)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every host waits here until all arrive (a no-op on one host)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def host_rows(mesh, batch_size: int) -> np.ndarray:
    """The global row numbers of a [batch_size, ...] batch that this host's devices hold, in the
    order jax.make_array_from_process_local_data expects them (ascending)."""
    sharding = NamedSharding(mesh, BATCH_SPEC)
    rows = set()
    for index in sharding.addressable_devices_indices_map((batch_size,)).values():
        rows.update(range(batch_size)[index[0]])
    return np.asarray(sorted(rows), np.int64)


def global_batch(arrays: dict, mesh, batch_size: int) -> dict:
    """One global jax.Array per input, from this host's rows (`host_rows`) of each."""
    sharding = NamedSharding(mesh, BATCH_SPEC)
    return {k: jax.make_array_from_process_local_data(sharding, v, (batch_size, *v.shape[1:]))
            for k, v in arrays.items()}


def replicate_on_mesh(tree, mesh):
    """Every leaf not yet laid out on `mesh` (a fresh step counter, rng, optimizer count),
    replicated over it: the state a checkpoint restores into then spans all hosts' devices."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(leaf):
        if isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == mesh:
            return leaf
        return jax.device_put(np.asarray(leaf), replicated)  # the same value on every host

    return jax.tree.map(place, tree)
