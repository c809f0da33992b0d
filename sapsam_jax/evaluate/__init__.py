"""Evaluation: Table-2-style reports with bootstrap intervals, figures, localisation scores.

Last stage of the pipeline; ``scripts/evaluate.py`` is its command line.
"""

from sapsam_jax.evaluate._figures import write_run_figures
from sapsam_jax.evaluate._rebuild import find_trained_runs, rebuild_predictions
from sapsam_jax.evaluate._report import (
    ReportError,
    checkpoint_epochs,
    find_runs,
    render_markdown,
    run_results,
    write_report,
)
from sapsam_jax.train._metrics import (
    METRIC_NAMES,
    binary_metrics,
    bootstrap_intervals,
    confusion,
    roc_auc,
    roc_curve,
)

__all__ = [
    "METRIC_NAMES",
    "ReportError",
    "checkpoint_epochs",
    "binary_metrics",
    "bootstrap_intervals",
    "confusion",
    "find_runs",
    "find_trained_runs",
    "rebuild_predictions",
    "render_markdown",
    "roc_auc",
    "roc_curve",
    "run_results",
    "write_report",
    "write_run_figures",
]
