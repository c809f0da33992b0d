"""Training: disease, sign and survival tasks (paper 2.3-2.4, 3.1-3.3).

``train(config)`` runs a job; ``scripts/train.py`` is its command line. ``load_trained(workdir)``
brings a finished run back for Grad-CAM and reports.
"""

from sapsam_jax.train._config import (
    PAPER,
    QUICK,
    TINY,
    TRAIN_PRESETS,
    SyntheticCohortConfig,
    TrainConfig,
    preset_config,
    resolve_preset,
)
from sapsam_jax.train._metrics import (
    METRIC_NAMES,
    binary_metrics,
    bootstrap_intervals,
    confusion,
    roc_auc,
    roc_curve,
)
from sapsam_jax.train._model import TrainedRun, build_model, load_trained, model_inputs

__all__ = [
    "METRIC_NAMES",
    "PAPER",
    "QUICK",
    "TINY",
    "TRAIN_PRESETS",
    "SyntheticCohortConfig",
    "TrainConfig",
    "TrainedRun",
    "binary_metrics",
    "bootstrap_intervals",
    "build_model",
    "confusion",
    "load_trained",
    "model_inputs",
    "preset_config",
    "resolve_preset",
    "roc_auc",
    "roc_curve",
    "train",
]


def train(config, **kwargs):
    """Run the training job ``config`` (see sapsam_jax.train._loop.train)."""
    from sapsam_jax.train._loop import train as _train

    return _train(config, **kwargs)
