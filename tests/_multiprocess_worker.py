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


def main(workdir: str, epochs: str) -> None:
    from _fake_cache import FakeCache

    from sapsam_jax.train._loop import fit, maybe_initialize_distributed

    maybe_initialize_distributed()
    fit(tiny_fit_config(workdir, int(epochs)), FakeCache(n_patients=10), log=print)


if __name__ == "__main__":
    main(*sys.argv[1:3])
