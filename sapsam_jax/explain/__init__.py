"""Explain: Grad-CAM maps (paper 2.5, eq. (1)), PSAMs back in CT space, 3-D PSAMs, localisation.

See docs/readme/explain.md.
"""

from sapsam_jax.explain._gradcam import CAM_METHODS, cam_weights, grad_cam, normalize_maps

__all__ = ["CAM_METHODS", "cam_weights", "grad_cam", "normalize_maps"]
