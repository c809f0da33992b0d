"""Rebuild test predictions of finished runs from their best checkpoints (scripts/evaluate.py)."""

from __future__ import annotations

from pathlib import Path

from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sapsam_jax.evaluate._report import find_runs
from sapsam_jax.train import load_trained
from sapsam_jax.train._checkpoint import saved_epochs


def find_trained_runs(workdirs) -> list[Path]:
    """Run folders at or below ``workdirs`` whose first epoch finished (a checkpoint exists)."""
    return [
        run
        for run in find_runs(workdirs, marker="run.json")
        if saved_epochs(run)  # not a save still in progress
    ]


def rebuild_predictions(run_dir: Path) -> dict:
    """Predict the run's held-out test patients again with its best checkpoint."""
    from sapsam_jax.data import ProjectionCache
    from sapsam_jax.train._data import data_mesh
    from sapsam_jax.train._loop import _replicate, load_run_data, write_test_predictions
    from sapsam_jax.train._model import trained_studies

    run = load_trained(run_dir)
    # The studies the run was tested on, not whatever the folder or manifest holds since.
    cache = ProjectionCache(run.config.cache, studies=trained_studies(run.split))
    data = load_run_data(run.config, cache, Path(run_dir))
    mesh = data_mesh()
    _replicate(run.model, NamedSharding(mesh, P()))  # batches are sharded over every device
    return write_test_predictions(run.model, run.step_spec, data.test, mesh, Path(run_dir))
