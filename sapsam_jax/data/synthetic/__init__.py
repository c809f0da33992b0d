"""Synthetic chest-CT phantoms of CPA patients and controls with known truth.

Real CPA cohorts are private, so the toolkit ships this generator: randomised chest anatomy,
pre-existing lung conditions as confounders and the three CPA signs of the paper (cavities, fungus
balls, pleural thickening) placed per sub-region with Table 1 frequencies, over 1-3 longitudinal
scans per patient, written as DICOM (or NIfTI) with a cohort manifest and voxel label maps::

    from sapsam_jax.data.synthetic import make_cohort
    manifest = make_cohort("cohort/", n_patients=24)   # ~ (80, 128, 128) voxels per scan

See the README, "Synthetic CPA cohort".
"""

from ._cohort import (
    DEFAULT_CONTROL_FRACTION,
    GENERATOR_VERSION,
    MANIFEST_NAME,
    SyntheticScan,
    cohort_plan,
    generate_patient,
    lesion_twins,
    make_cohort,
    scan_twins,
    write_scan,
)
from ._grid import DEFAULT_SHAPE, DEFAULT_SPACING, Grid, default_spacing
from ._lesions import LABELS, LungBox, table1_rates

__all__ = [
    "DEFAULT_CONTROL_FRACTION",
    "DEFAULT_SHAPE",
    "DEFAULT_SPACING",
    "GENERATOR_VERSION",
    "LABELS",
    "MANIFEST_NAME",
    "Grid",
    "LungBox",
    "SyntheticScan",
    "cohort_plan",
    "default_spacing",
    "generate_patient",
    "lesion_twins",
    "make_cohort",
    "scan_twins",
    "table1_rates",
    "write_scan",
]
