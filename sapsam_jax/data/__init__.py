"""Cohort data: manifest, synthetic phantoms, projection cache, splits, samples, augmentation.

Stage 3 of the pipeline (after ``io`` and ``preprocess``); see docs/ARCHITECTURE.md.
"""

import importlib

from sapsam_jax.data._augment import augment_batch, rotate_zoom
from sapsam_jax.data._samples import SampleSet, study_label, task_samples
from sapsam_jax.data._splits import (
    SPLIT_NAMES,
    SplitError,
    balance_indices,
    check_split,
    split_by_patient,
)

# Names whose modules pull in the io/preprocess stages are loaded on first use, so that
# `import sapsam_jax.data.synthetic` stays light.
_LAZY = {
    "read_manifest": "sapsam_jax.io",
    "write_manifest": "sapsam_jax.io",
    "Manifest": "sapsam_jax.io",
    "Study": "sapsam_jax.io",
    "ManifestError": "sapsam_jax.io",
    "ProjectionCache": "sapsam_jax.data._cache",
    "CACHE_VERSION": "sapsam_jax.data._cache",
    "preprocess_cohort": "sapsam_jax.data._cohort",
}

__all__ = [
    "SPLIT_NAMES",
    "SampleSet",
    "SplitError",
    "augment_batch",
    "balance_indices",
    "check_split",
    "rotate_zoom",
    "split_by_patient",
    "study_label",
    "task_samples",
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sapsam_jax.data' has no attribute {name!r}")
