"""Explain: Grad-CAM maps (paper 2.5, eq. (1)), PSAMs back in CT space, 3-D PSAMs, localisation.

See docs/readme/explain.md.
"""

from sapsam_jax.explain._gradcam import CAM_METHODS, cam_weights, grad_cam, normalize_maps
from sapsam_jax.explain._psam import (
    backproject,
    ct_to_rotated_affine,
    locate_maximum,
    projection_shape,
    psam_3d,
    psam_to_ct,
    resize_map,
    rotated_to_ct,
    rotation_angles,
    working_volume_to_ct,
)

__all__ = [
    "CAM_METHODS",
    "backproject",
    "cam_weights",
    "ct_to_rotated_affine",
    "grad_cam",
    "locate_maximum",
    "normalize_maps",
    "projection_shape",
    "psam_3d",
    "psam_to_ct",
    "resize_map",
    "rotated_to_ct",
    "rotation_angles",
    "working_volume_to_ct",
]
