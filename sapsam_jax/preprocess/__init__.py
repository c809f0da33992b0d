"""Preprocessing of one CT scan: lung masks, resampling, 27 rotations, projections (paper 2.1-2.3).

Orientation, axes and sub-regions: ``docs/ARCHITECTURE.md``; usage: the README, "Preprocessing".
"""

from ._geometry import (
    ct_to_working,
    grid_mapping,
    lung_bbox,
    resample_to_grid,
    rotate_coords,
    rotate_volume,
    unrotate_coords,
    working_to_ct,
)
from ._projection import (
    average_projection,
    band_membership,
    band_projection,
    rotate_project,
    subregion_band_projections,
)
from ._scan import ScanProjections, lesion_projections, preprocess_scan
from ._subregions import (
    axis_index,
    subregion_fractions,
    subregion_image_shape,
    subregion_shape,
    subregion_slices,
)

try:  # The segmentation stage (_mask.py) lands separately; everything else works without it.
    from ._mask import lung_mask, lung_masks
except ImportError:  # pragma: no cover - only while _mask.py is missing
    pass

__all__ = [
    "ScanProjections",
    "average_projection",
    "axis_index",
    "band_membership",
    "band_projection",
    "ct_to_working",
    "grid_mapping",
    "lesion_projections",
    "lung_bbox",
    "lung_mask",
    "lung_masks",
    "preprocess_scan",
    "resample_to_grid",
    "rotate_coords",
    "rotate_project",
    "rotate_volume",
    "subregion_band_projections",
    "subregion_fractions",
    "subregion_image_shape",
    "subregion_shape",
    "subregion_slices",
    "unrotate_coords",
    "working_to_ct",
]
if "lung_mask" not in globals():  # pragma: no cover
    __all__ = [name for name in __all__ if name not in ("lung_mask", "lung_masks")]
