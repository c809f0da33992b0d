"""PSAMs back in the scan: projection pixels -> working-grid rays -> CT voxels (paper 2.5, 4).

A sub-region image is the average along one axis of a slice of the (rotated) working volume
(paper 2.3; docs/ARCHITECTURE.md), so a map pixel stands for every voxel on its ray inside that
sub-region. Going back is three steps, each undoing one step of the preprocessing:

1. :func:`backproject`: map (any size) -> resized to the projection image -> broadcast along the
   ray inside the sub-region of a working-grid volume (zero elsewhere).
2. :func:`working_volume_to_ct`: working grid (rotated by augmentation ``rotation``, about the
   working-volume centre, ``preprocess.rotate_coords``) -> CT grid through the cache ``mapping``
   (crop box + scale, ``preprocess.working_to_ct``), in one interpolation.
3. :func:`psam_3d`: the paper's future work, "3D positioning": the axial, coronal and sagittal
   maps of one sub-region, back-projected and combined by their geometric mean, are high only
   where all three rays agree.

:func:`locate_maximum` reports where a 3-D map peaks, in CT voxels, patient mm and sub-region
terms (nothing for a map that is zero everywhere).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
import scipy.ndimage as ndi

from sapsam_jax.config import AXES, GeometryConfig, rotation_matrix
from sapsam_jax.preprocess import (
    axis_index,
    ct_to_working,
    subregion_slices,
    working_to_ct,
)

_ROTATIONS = GeometryConfig().rotations()  # paper 2.3: index 0-26, 13 is the identity


def rotation_angles(rotation) -> tuple[float, float, float] | None:
    """(about-k, about-j, about-i) degrees of ``rotation``: an index 0-26, a triple, or None.

    An index reads the paper's table, ``GeometryConfig().rotations()`` (-5, 0, +5 degrees about
    each axis; the default cache's first array axis). A cache built with other angles must pass
    its own angles (``explain.view_maps`` records them as ``ViewMaps.angles``). None and the
    identity give None (no rotation to undo).
    """
    if rotation is None:
        return None
    if np.ndim(rotation) == 0:
        angles = _ROTATIONS[rotation_index(rotation)]
    else:
        angles = tuple(float(a) for a in rotation)
        if len(angles) != 3:
            raise ValueError(f"rotation must be an index 0-26 or 3 angles, got {rotation!r}")
    return None if not np.any(angles) else tuple(float(a) for a in angles)


def rotation_index(rotation, count: int = len(_ROTATIONS)) -> int:
    """``rotation`` as an index of a table of ``count`` rotations (the paper's by default);
    anything else (-1 would silently read the last entry, 2.7 the third) is refused."""
    is_integer = np.issubdtype(np.asarray(rotation).dtype, np.integer)  # bool is not
    if not is_integer or not 0 <= rotation < count:
        raise ValueError(f"rotation index must be an integer 0-{count - 1}, got {rotation!r}")
    return int(rotation)


def region_slices(subregion: str | None, working_shape) -> tuple[slice, slice, slice]:
    """Working-grid slices of ``subregion`` (``config.SUBREGIONS``); None: the whole volume."""
    if subregion is None:
        return (slice(None),) * 3
    slices = subregion_slices(working_shape)
    if subregion not in slices:
        raise ValueError(f"unknown sub-region {subregion!r}; expected one of {', '.join(slices)}")
    return slices[subregion]


def projection_shape(axis, subregion: str | None, working_shape) -> tuple[int, int]:
    """(H, W) of the cache image of ``subregion`` (None: whole scan) projected along ``axis``."""
    a = axis_index(axis)
    region = np.zeros(working_shape, dtype=bool)[region_slices(subregion, working_shape)]
    return tuple(n for d, n in enumerate(region.shape) if d != a)


def resize_map(map2d, shape) -> np.ndarray:
    """Bilinear resize of a map to ``shape`` (the inverse of the model-input resize).

    Training resizes cache images to the run's image size with ``jax.image.resize`` (bilinear);
    the map goes back the same way. Identity when the shape already matches.
    """
    map2d = np.asarray(map2d, dtype=np.float32)
    if map2d.shape == tuple(shape):
        return map2d
    return np.asarray(jax.image.resize(map2d, tuple(shape), method="bilinear"))


def backproject(map2d, axis, subregion: str | None, working_shape) -> np.ndarray:
    """Working-grid volume (float32) holding ``map2d`` along each ray inside ``subregion``.

    An average projection gives every voxel of a ray the same weight, so the map value of a pixel
    is spread evenly along its ray (paper 2.3). ``map2d`` is resized to the projection's shape
    first; ``subregion=None`` means a whole-scan (gray) image. Image axes keep array order
    (ARCHITECTURE: axial (j, i), coronal (k, i), sagittal (k, j)), so no flips are needed.
    """
    a = axis_index(axis)
    shape = projection_shape(a, subregion, working_shape)
    plane = np.expand_dims(resize_map(map2d, shape), a)
    volume = np.zeros(working_shape, dtype=np.float32)
    region = region_slices(subregion, working_shape)
    volume[region] = np.broadcast_to(plane, volume[region].shape)
    return volume


def ct_to_rotated_affine(mapping: Mapping, rotation=None) -> tuple[np.ndarray, np.ndarray]:
    """``(matrix, offset)``: CT voxel p -> coordinate in the (rotated) working volume.

    ``ct_to_working`` is diagonal (crop box and scale); augmentation moved content at w to
    R (w - c) + c about the working centre c (as ``preprocess.rotate_volume``). Composed, a CT voxel
    reads the rotated volume at R D p + (R (e - c) + c) with ``ct_to_working(p) = D p + e``.
    """
    e = ct_to_working(np.zeros(3), mapping)
    d = ct_to_working(np.ones(3), mapping) - e
    matrix, offset = np.diag(d), e
    angles = rotation_angles(rotation)
    if angles is not None:
        rot = rotation_matrix(angles)
        centre = (np.asarray(mapping["working_shape"], dtype=np.float64) - 1.0) / 2.0
        matrix, offset = rot @ matrix, rot @ (e - centre) + centre
    return matrix, offset


def rotated_to_ct(points, mapping: Mapping, rotation=None) -> np.ndarray:
    """CT voxel coordinates (..., 3) of points given in the (rotated) working volume."""
    points = np.asarray(points, dtype=np.float64)
    angles = rotation_angles(rotation)
    if angles is not None:
        shape = mapping["working_shape"]
        # rotate_coords applies R about the centre; its inverse is the transposed rotation.
        centre = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
        points = (points - centre) @ rotation_matrix(angles) + centre
    return working_to_ct(points, mapping)


def working_volume_to_ct(volume, mapping: Mapping, *, rotation=None, order: int = 1, ct_k=None):
    """Resample a working-grid volume onto the CT grid (``mapping["ct_shape"]``), float32.

    Pulls every CT voxel from ``volume`` through the inverse mapping (and the augmentation
    ``rotation``, :func:`rotation_angles`, when the volume lives in a rotated frame) with one
    ``scipy.ndimage.affine_transform``; voxels outside the working grid get 0. Only the CT box
    that can see the volume's non-zero support is interpolated, so a sub-region map costs a sixth
    of the lung box. With ``ct_k`` only that axial CT slice is computed and returned, (J, I).
    """
    volume = np.asarray(volume, dtype=np.float32)
    if volume.shape != tuple(mapping["working_shape"]):
        raise ValueError(
            f"volume {volume.shape} is not on the working grid {tuple(mapping['working_shape'])}"
        )
    out = np.zeros(tuple(mapping["ct_shape"]), dtype=np.float32)
    if ct_k is not None:
        if not 0 <= int(ct_k) < out.shape[0]:
            raise ValueError(f"ct_k {ct_k} is not a slice of the CT's {out.shape[0]}")
        out = out[int(ct_k) : int(ct_k) + 1]
    box = _ct_box_of_support(volume, mapping, rotation, ct_k)
    if box is not None:
        matrix, offset = ct_to_rotated_affine(mapping, rotation)
        start = np.array([s.start for s in box], dtype=np.float64)
        local = box if ct_k is None else (slice(0, 1),) + box[1:]
        out[local] = _pull(volume, matrix, offset + matrix @ start, out[local].shape, order)
    return out if ct_k is None else out[0]


def _pull(volume, matrix, offset, shape, order: int) -> np.ndarray:
    """``volume`` sampled at ``matrix @ q + offset`` for every output voxel q; 0 off the grid.

    A working voxel covers [w - 0.5, w + 0.5], so CT voxels up to half a working voxel past the
    outer voxel centres still belong to it (scipy's ``mode="constant"`` would drop them and leave
    the top CT slice of a box empty): the volume is edge-padded by one voxel for interpolation
    and the footprint [-0.5, n - 0.5] is cut by a nearest-neighbour pull of a padded mask.
    """
    shift = offset + 1.0  # index i of the volume is index i + 1 of the padded one
    padded = np.pad(volume, 1, mode="edge")
    values = ndi.affine_transform(
        padded, matrix, offset=shift, output_shape=shape, order=order, mode="constant", cval=0.0
    )
    inside = np.pad(np.ones(volume.shape, np.uint8), 1)
    footprint = ndi.affine_transform(
        inside, matrix, offset=shift, output_shape=shape, order=0, mode="constant", cval=0
    )
    return np.where(footprint > 0, values, np.float32(0.0))


def _ct_box_of_support(volume, mapping, rotation, ct_k=None) -> tuple[slice, ...] | None:
    """CT slices covering the non-zero voxels of ``volume`` (its box corners mapped, +1 voxel)."""
    nonzero = [
        np.flatnonzero(volume.any(axis=tuple(d for d in range(3) if d != a))) for a in range(3)
    ]
    if any(n.size == 0 for n in nonzero):
        return None
    lo = np.array([n[0] for n in nonzero], dtype=np.float64) - 1.0
    hi = np.array([n[-1] for n in nonzero], dtype=np.float64) + 1.0
    corners = np.array(np.meshgrid(*zip(lo, hi, strict=True), indexing="ij")).reshape(3, -1).T
    ct = rotated_to_ct(corners, mapping, rotation)
    shape = np.asarray(mapping["ct_shape"])
    start = np.clip(np.floor(ct.min(axis=0)).astype(int) - 1, 0, shape)
    stop = np.clip(np.ceil(ct.max(axis=0)).astype(int) + 2, 0, shape)
    if ct_k is not None:
        start[0], stop[0] = max(start[0], int(ct_k)), min(stop[0], int(ct_k) + 1)
    if np.any(stop <= start):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))


def psam_to_ct(map2d, *, axis, subregion: str | None, mapping: Mapping, rotation=None):
    """One map on the CT grid: :func:`backproject` then :func:`working_volume_to_ct`."""
    volume = backproject(map2d, axis, subregion, tuple(mapping["working_shape"]))
    return working_volume_to_ct(volume, mapping, rotation=rotation)


def psam_3d(maps: Mapping, subregion: str | None, working_shape) -> np.ndarray:
    """3-D PSAM of one sub-region: geometric mean of its back-projected, [0, 1]-scaled maps.

    ``maps`` is ``{axis: map2d}`` for any of axial/coronal/sagittal (all three for 3-D
    localisation; with one axis this is its back-projection). Each map is scaled to [0, 1] by its
    own maximum so no axis dominates; the geometric mean ``(prod_a m_a)^(1/n)`` acts as a soft
    AND of the rays: a voxel is high only where every view's ray through it is high, which is what
    pins a 2-D activation down in depth. Zero outside the sub-region. float32 on the working grid.
    """
    if not maps:
        raise ValueError("psam_3d needs at least one map")
    log_sum = np.zeros(working_shape, dtype=np.float32)
    region = region_slices(subregion, working_shape)
    for axis, map2d in maps.items():
        if axis not in AXES:
            raise ValueError(f"unknown axis {axis!r}; expected one of {', '.join(AXES)}")
        scaled = _unit_scale(np.asarray(map2d, dtype=np.float32))
        with np.errstate(divide="ignore"):
            log_sum[region] += np.log(backproject(scaled, axis, subregion, working_shape)[region])
    out = np.zeros(working_shape, dtype=np.float32)
    out[region] = np.exp(log_sum[region] / len(maps))
    return out


def _unit_scale(map2d: np.ndarray) -> np.ndarray:
    """``map / max`` after clipping at 0 (Grad-CAM maps are >= 0); a zero map stays zero."""
    map2d = np.maximum(map2d, 0.0)
    top = float(map2d.max()) if map2d.size else 0.0
    return map2d / top if top > 0 else np.zeros_like(map2d)


# Voxels within this share of the maximum count as the peak (maps of step-like rays plateau).
PEAK_PLATEAU = 0.01


def plateau_peak(values) -> tuple[float, np.ndarray] | None:
    """(maximum, fractional index of where it is) of an array, None when nothing is above 0.

    Upsampled and back-projected maps are piecewise flat near their maximum, and the first
    arg-max is a plateau's first (top-left) pixel, not its place: the position is the centroid of
    the connected values within ``PEAK_PLATEAU`` of the maximum around that arg-max.
    """
    values = np.asarray(values)
    index = np.unravel_index(int(np.argmax(values)), values.shape)
    top = float(values[index])
    if not top > 0:
        return None
    components, _ = ndi.label(values >= top * (1.0 - PEAK_PLATEAU))
    return top, np.asarray(ndi.center_of_mass(components == components[index]))


def map_peak(map2d) -> tuple[float, np.ndarray] | None:
    """:func:`plateau_peak` of a 2-D map, None also when the map is flat: no place stands out
    (e.g. InceptionV3's 1x1 ``mixed10`` enlarged), and its arg-max would be the image corner."""
    map2d = np.asarray(map2d)
    return None if np.ptp(map2d) == 0 else plateau_peak(map2d)


def locate_maximum(volume, mapping: Mapping, affine=None, *, rotation=None) -> dict | None:
    """Where a working-grid volume (e.g. a 3-D PSAM) peaks, in every frame a reader needs; None
    when nothing is above 0.

    A 3-D PSAM is zero everywhere when one view's map is (the geometric mean is an AND), and the
    arg-max of zeros is the lung-box corner, not a finding: such a volume has no maximum.
    Back-projected rays are piecewise constant, so the maximum is often a plateau; its position
    is its centroid (:func:`plateau_peak`). Returns ``{"value", "working_index" (fractional (k,
    j, i)), "ct_index" (fractional CT voxel (k, j, i)), "lps_mm" (patient LPS via the CT
    ``affine``; None without it), "subregion" (name, or None outside all six), "relative"
    {"superior", "posterior", "left"}: the position inside that sub-region along k, j and i, 0
    (inferior / anterior / right edge) .. 1}``. ``working_index``, ``subregion`` and
    ``relative`` are in the frame of ``volume`` (the rotated working grid when ``rotation`` is
    given, see :func:`rotation_angles`); ``ct_index`` and ``lps_mm`` undo the rotation.
    """
    peak = plateau_peak(volume)
    if peak is None:
        return None
    top, centre = peak
    ct_index = rotated_to_ct(centre, mapping, rotation)
    lps = None
    if affine is not None:
        lps = (np.asarray(affine, dtype=np.float64) @ np.append(ct_index, 1.0))[:3].tolist()
    name, relative = _subregion_position(centre, volume.shape)
    return {
        "value": top,
        "working_index": centre.tolist(),
        "ct_index": ct_index.tolist(),
        "lps_mm": lps,
        "subregion": name,
        "relative": relative,
    }


def _subregion_position(index, working_shape) -> tuple[str | None, dict | None]:
    """Sub-region containing ``index`` and the relative position inside it (0..1 per axis)."""
    index = np.floor(np.asarray(index, dtype=np.float64) + 0.5).astype(int)
    for name, region in subregion_slices(working_shape).items():
        bounds = [s.indices(n) for s, n in zip(region, working_shape, strict=True)]
        if all(b[0] <= i < b[1] for i, b in zip(index, bounds, strict=True)):
            rel = [(i - b[0] + 0.5) / (b[1] - b[0]) for i, b in zip(index, bounds, strict=True)]
            return name, dict(zip(("superior", "posterior", "left"), rel, strict=True))
    return None, None
