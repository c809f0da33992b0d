"""Explain: Grad-CAM maps (paper 2.5, eq. (1)), PSAMs back in CT space, 3-D PSAMs, localisation.

See the README, "Explaining predictions".
"""

from sapsam_jax.explain._cli import main
from sapsam_jax.explain._figures import figure_title, save_fig3, save_psam3d_figure
from sapsam_jax.explain._gradcam import CAM_METHODS, cam_weights, grad_cam, normalize_maps
from sapsam_jax.explain._localisation import (
    dilate_mask,
    distance_to_lesion_mm,
    energy_inside,
    localisation_report,
    localisation_scores,
    pointing_game,
)
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
from sapsam_jax.explain._study import (
    ViewMaps,
    explain_study,
    find_workdirs,
    run_labels,
    split_studies,
    target_class,
    view_maps,
)

__all__ = [
    "CAM_METHODS",
    "ViewMaps",
    "backproject",
    "cam_weights",
    "ct_to_rotated_affine",
    "dilate_mask",
    "distance_to_lesion_mm",
    "energy_inside",
    "explain_study",
    "figure_title",
    "find_workdirs",
    "grad_cam",
    "localisation_report",
    "localisation_scores",
    "locate_maximum",
    "main",
    "normalize_maps",
    "pointing_game",
    "projection_shape",
    "psam_3d",
    "psam_to_ct",
    "resize_map",
    "rotated_to_ct",
    "rotation_angles",
    "run_labels",
    "save_fig3",
    "save_psam3d_figure",
    "split_studies",
    "target_class",
    "view_maps",
    "working_volume_to_ct",
]
