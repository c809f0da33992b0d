"""Runs across processes (``jax.distributed``, one process per host): joining the job, which
process writes the run's files, and waiting for each other.

Every process trains (each feeds its slice of every global batch, ``_data.to_global``) and takes
part in each Orbax save; the first process alone writes the workdir's other files and logs, so a
shared workdir gets one clean copy of each. Workdir and data directory must be on a file system
that every host sees (Orbax needs that for its checkpoints anyway).
"""

from __future__ import annotations

import os

import jax


def maybe_initialize_distributed() -> None:
    """Join a multi-process job when launched as one.

    ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0) starts it; ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID`` give the job's size and this process's rank. Without those two, JAX reads
    them from a cluster manager it knows (SLURM, Open MPI, ...).
    """
    if not os.environ.get("JAX_COORDINATOR_ADDRESS") or jax.distributed.is_initialized():
        return
    count, rank = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
    jax.distributed.initialize(
        num_processes=int(count) if count else None,
        process_id=int(rank) if rank else None,
    )


def is_primary() -> bool:
    """Whether this process writes the run's files and logs (process 0; every process trains)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process of the job reaches the barrier ``name`` (one process: no-op)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def primary_log(log):
    """``log`` on the first process, a no-op on the others (one copy of each line)."""
    return log if is_primary() else (lambda *args, **kwargs: None)
