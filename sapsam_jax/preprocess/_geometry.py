"""Lung bounding box, resampling to the paper's grid, and the 27 rotations (paper 2.3).

Everything here goes through ``bk.ndi.affine_transform`` (scipy.ndimage on the CPU,
cupyx.scipy.ndimage on the GPU), so one interpolation serves both backends. Coordinates are
``(k, j, i)`` voxel indices in the orientation of ``docs/ARCHITECTURE.md``.

Grid mapping (JSON-serialisable dict, stored in each study's ``meta.json``): working-grid voxel
``w`` sits at CT voxel coordinate ``crop_start - 0.5 + (w + 0.5) * scale`` (voxel centres of the
crop box and of the working grid are aligned, as in ``skimage.transform.resize``)::

    {"ct_shape": [K, J, I], "spacing_mm": [dk, dj, di],
     "crop_start": [k0, j0, i0], "crop_stop": [k1, j1, i1],      # CT voxels, stop exclusive
     "working_shape": [Kw, Jw, Iw], "scale": [sk, sj, si],        # CT voxels per working voxel
     "working_spacing_mm": [...]}
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import backend_of
from ..config import PAPER, GeometryConfig, rotation_matrix

_PAPER_GEOMETRY = PAPER.geometry


def geometry_config(config) -> GeometryConfig:
    """The GeometryConfig inside ``config`` (a PreprocessConfig or a GeometryConfig)."""
    return getattr(config, "geometry", config)


def lung_bbox(mask, spacing, margin_mm: float = GeometryConfig.bbox_margin_mm):
    """Bounding box of ``mask`` grown by ``margin_mm``, as a (slice_k, slice_j, slice_i) tuple.

    The sub-region thirds and halves are thirds and halves of this box (ARCHITECTURE.md), so it
    is taken from the refined mask. An empty mask gives the whole volume (flagged by QC).
    """
    xp = backend_of(mask).xp
    box = []
    for axis, (n, step) in enumerate(zip(mask.shape, spacing, strict=True)):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = xp.flatnonzero(xp.any(mask, axis=other))
        if hits.size == 0:
            return tuple(slice(0, m) for m in mask.shape)
        pad = int(math.ceil(margin_mm / float(step)))
        lo, hi = int(hits[0]), int(hits[-1]) + 1
        box.append(slice(max(lo - pad, 0), min(hi + pad, n)))
    return tuple(box)


def grid_mapping(ct_shape, spacing, bbox, working_shape) -> dict:
    """The crop box and scale that take the working grid back to CT voxels (module docstring)."""
    bbox = _as_slices(bbox, ct_shape)
    start = [s.start for s in bbox]
    stop = [s.stop for s in bbox]
    scale = [(b - a) / n for a, b, n in zip(start, stop, working_shape, strict=True)]
    return {
        "ct_shape": [int(n) for n in ct_shape],
        "spacing_mm": [float(s) for s in spacing],
        "crop_start": [int(a) for a in start],
        "crop_stop": [int(b) for b in stop],
        "working_shape": [int(n) for n in working_shape],
        "scale": [float(s) for s in scale],
        "working_spacing_mm": [float(s * d) for s, d in zip(scale, spacing, strict=True)],
    }


def working_to_ct(coords, mapping: dict) -> np.ndarray:
    """CT voxel coordinates (float, (..., 3)) of working-grid coordinates ``coords`` (..., 3)."""
    start = np.asarray(mapping["crop_start"], dtype=np.float64)
    scale = np.asarray(mapping["scale"], dtype=np.float64)
    return start - 0.5 + (np.asarray(coords, dtype=np.float64) + 0.5) * scale


def ct_to_working(coords, mapping: dict) -> np.ndarray:
    """Inverse of :func:`working_to_ct`."""
    start = np.asarray(mapping["crop_start"], dtype=np.float64)
    scale = np.asarray(mapping["scale"], dtype=np.float64)
    return (np.asarray(coords, dtype=np.float64) - start + 0.5) / scale - 0.5


def resample_to_grid(volume, spacing, bbox, config=_PAPER_GEOMETRY, order: int = 1):
    """Resample the ``bbox`` crop of ``volume`` onto ``config.working_shape`` in one interpolation.

    Paper 2.3 rescales every scan to 512x512x432 and then downsamples by 2; both zooms are
    combined into one ``affine_transform`` (no intermediate 432x512x512 volume). Boolean volumes
    (masks) are interpolated linearly and re-thresholded at ``config.mask_threshold``; others come
    back float32. Returns ``(resampled, mapping)``, the mapping as in the module docstring.
    """
    bk, config = backend_of(volume), geometry_config(config)
    mapping = grid_mapping(volume.shape, spacing, bbox, config.working_shape)
    crop = volume[_as_slices(bbox, volume.shape)]
    is_mask = crop.dtype == bool
    crop = crop.astype(bk.xp.float32)
    scale = np.asarray(mapping["scale"])
    if config.anti_alias and order > 0:
        # Shrinking by `scale` aliases fine texture; skimage.resize's sigma = (scale - 1) / 2.
        sigma = np.maximum((scale - 1.0) / 2.0, 0.0)
        if sigma.any():
            crop = bk.ndi.gaussian_filter(crop, sigma=tuple(sigma), mode="nearest")
    out = bk.ndi.affine_transform(
        crop,
        # Diagonal zoom: working voxel w samples crop coordinate scale * w + offset.
        # CuPy Backend: cupyx divides device offsets by `matrix`, so it must be a device array.
        matrix=bk.xp.asarray(scale),
        offset=tuple(0.5 * scale - 0.5),
        output_shape=tuple(config.working_shape),
        order=order,
        mode="nearest",  # the box is inside the CT, so edge samples clamp rather than fill
    )
    if is_mask:
        return out >= config.mask_threshold, mapping
    return out, mapping


def _as_slices(bbox, shape) -> tuple[slice, slice, slice]:
    if bbox is None:
        return tuple(slice(0, n) for n in shape)
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(bbox, shape, strict=True))


def inverse_rotation(angles_deg, shape) -> tuple[np.ndarray, np.ndarray]:
    """``(matrix, offset)`` taking an output voxel to the input voxel it samples.

    A rotation by R about the centre c moves content at x to R (x - c) + c, so output voxel o
    samples input R^T (o - c) + c: matrix R^T, offset c - R^T c.
    """
    inv = rotation_matrix(angles_deg).T
    centre = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    return inv, centre - inv @ centre


def rotate_coords(coords, angles_deg, shape) -> np.ndarray:
    """Where the points ``coords`` (..., 3) of a volume of ``shape`` go under the rotation."""
    centre = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    rot = rotation_matrix(angles_deg)
    return (np.asarray(coords, dtype=np.float64) - centre) @ rot.T + centre


def unrotate_coords(coords, angles_deg, shape) -> np.ndarray:
    """Inverse of :func:`rotate_coords`: where points of a rotated volume came from."""
    centre = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    rot = rotation_matrix(angles_deg)
    return (np.asarray(coords, dtype=np.float64) - centre) @ rot + centre


def rotate_volume(volume, angles_deg, order: int = 1, *, config=_PAPER_GEOMETRY):
    """Rotate ``volume`` about its centre by ``config.rotation_matrix(angles_deg)`` (paper 2.3).

    One ``affine_transform`` with the composed matrix, not three successive rotations. HU
    volumes come back float32, filled with ``config.fill_hu`` where the rotation brings in space
    from outside; boolean masks are rotated linearly and re-thresholded (filled with False).
    """
    bk, config = backend_of(volume), geometry_config(config)
    is_mask = volume.dtype == bool
    if not np.any(angles_deg):  # the identity (index 13) is exact, not interpolated
        return volume.copy() if is_mask else volume.astype(bk.xp.float32)
    matrix, offset = inverse_rotation(angles_deg, volume.shape)
    out = bk.ndi.affine_transform(
        volume.astype(bk.xp.float32),
        matrix=bk.xp.asarray(matrix),  # CuPy Backend: cupyx copies it into a device array
        offset=tuple(offset),
        order=order,
        mode="constant",
        cval=0.0 if is_mask else config.fill_hu,
    )
    if is_mask:
        return out >= config.mask_threshold
    return out


__all__ = [
    "ct_to_working",
    "geometry_config",
    "grid_mapping",
    "inverse_rotation",
    "lung_bbox",
    "resample_to_grid",
    "rotate_coords",
    "rotate_volume",
    "unrotate_coords",
    "working_to_ct",
]
