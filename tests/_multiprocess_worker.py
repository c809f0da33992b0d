"""One process of the two-process training test (tests/test_multiprocess.py).

Run as ``python tests/_multiprocess_worker.py WORKDIR EPOCHS`` with ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` set and one CPU device per process: it joins the job
the way ``scripts/train.py`` does and trains the tiny network on the toy cache.
"""

import sys


def tiny_fit_config(workdir, epochs: int = 2):
    """The tiny disease network (with a validation set, so the best-epoch logic runs)."""
    from sapsam_jax.train import TINY

    return TINY.replace(task="disease", epochs=epochs, frozen_blocks=0, workdir=str(workdir))


def lag_checkpoint_commits(seconds: float) -> None:
    """Make this process reach Orbax's end-of-write barriers ``seconds`` late.

    A loaded machine does this at random (CI once aborted on "Barrier _async_write_complete.1 is
    already ongoing": both checkpoint managers met under one barrier name); the lag makes that
    race happen on every save. Patches Orbax internals: without them, no lag.
    """
    import time

    try:
        from orbax.checkpoint._src.multihost import multihost

        real_client = multihost.get_jax_distributed_client
    except (ImportError, AttributeError):  # another Orbax layout: run without the lag
        return

    class LateClient:
        def __init__(self, client):
            self._client = client

        def wait_at_barrier(self, key, *args, **kwargs):
            if "async_write_complete" in key:
                time.sleep(seconds)
            return self._client.wait_at_barrier(key, *args, **kwargs)

        def __getattr__(self, name):
            return getattr(self._client, name)

    multihost.get_jax_distributed_client = lambda: LateClient(real_client())


def main(workdir: str, epochs: str) -> None:
    import os

    from _fake_cache import FakeCache

    from sapsam_jax.train._loop import fit, maybe_initialize_distributed

    lag = float(os.environ.get("LAG_CHECKPOINT_COMMITS_S", "0"))
    if lag:
        lag_checkpoint_commits(lag)
    maybe_initialize_distributed()
    fit(tiny_fit_config(workdir, int(epochs)), FakeCache(n_patients=10), log=print)


if __name__ == "__main__":
    main(*sys.argv[1:3])
