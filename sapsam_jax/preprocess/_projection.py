"""Average-intensity projections inside the lung mask (paper 2.2-2.3), on either backend.

Axes follow ``docs/ARCHITECTURE.md``: ``axial`` averages over ``k`` (image ``(j, i)``),
``coronal`` over ``j`` (image ``(k, i)``), ``sagittal`` over ``i`` (image ``(k, j)``); images keep
array order. Arrays come back on the backend they came in on (NumPy -> NumPy, CuPy -> CuPy).

HU bands (paper 2.2): voxel ``v`` is in band ``[lo, hi)``, except the last band, which is closed
``[lo, hi]``; with the paper's contiguous bands every HU in [-1400, 240] is in exactly one band
and anything outside (air below -1400, bone above 240) is in none. Each channel is the mean HU
of the in-mask, in-band voxels on the ray, rescaled to [0, 1] within its band; a ray with no
such voxel gives 0.

Rotations x projections (paper 2.3) come in three interchangeable methods, see
:func:`rotate_project`: ``unfused`` (rotate_volume, then project: the reference), ``twin``
(the fused kernel's sampling, written with ``ndi.map_coordinates``), ``fused`` (the CUDA kernel
``sapsam_rotate_project_bands_3d`` in ``kernels/project_bands.cu``: it samples rotated rays and
never builds the 27 rotated volumes).
"""

from __future__ import annotations

from ..backend import backend_of, is_cupy_array
from ..config import AXES, PAPER, PAPER_BANDS, ProjectionConfig
from ._geometry import inverse_rotation, rotate_volume
from ._subregions import axis_index, subregion_slices

METHODS = ("auto", "fused", "twin", "unfused")


def band_membership(hu, bands, index: int):
    """Boolean array: voxels of ``hu`` inside band ``index`` ([lo, hi), the last [lo, hi])."""
    lo, hi = bands[index]
    upper = hu <= hi if index == len(bands) - 1 else hu < hi
    return (hu >= lo) & upper


def _masked_mean(hu, inside, axis: int):
    """Mean of ``hu`` over ``inside`` along ``axis`` and whether the ray had any such voxel."""
    xp = backend_of(hu).xp
    total = xp.where(inside, hu, 0).sum(axis=axis, dtype=xp.float32)
    count = inside.sum(axis=axis, dtype=xp.int32)
    return total / xp.maximum(count, 1).astype(xp.float32), count > 0


def _rescale(mean, has_voxel, lo: float, hi: float):
    """Linear map of [lo, hi] onto [0, 1], clipped; 0 where the ray had no voxel."""
    xp = backend_of(mean).xp
    scaled = xp.clip((mean - lo) / (hi - lo), 0.0, 1.0)
    return xp.where(has_voxel, scaled, 0.0).astype(xp.float32)


def average_projection(hu, mask, axis, window=ProjectionConfig.gray_window_hu):
    """Mean HU of the in-mask voxels along ``axis``, scaled to [0, 1] by the fixed ``window``.

    The whole-scan grayscale image of paper 2.3 (conservative mask). ``axis`` is a name in
    ``config.AXES`` or an int (any ndim). Returns float32 of the remaining axes' shape.
    """
    # Non-zero voxels are in the mask whatever its dtype (a label map), as in the GPU kernel.
    mask = mask.astype(bool, copy=False)
    mean, has_voxel = _masked_mean(hu, mask, axis_index(axis, hu.ndim))
    return _rescale(mean, has_voxel, *window)


def band_projection(hu, mask, axis, bands=PAPER_BANDS):
    """Per HU band, the mean of the in-mask voxels in that band along ``axis``, in [0, 1].

    The RGB-like image of paper 2.2 (refined mask). Returns float32 ``(..., len(bands))``.
    """
    xp = backend_of(hu).xp
    a = axis_index(axis, hu.ndim)
    mask = mask.astype(bool, copy=False)  # as in average_projection: `&` needs booleans
    channels = []
    for b, (lo, hi) in enumerate(bands):
        mean, has_voxel = _masked_mean(hu, mask & band_membership(hu, bands, b), a)
        channels.append(_rescale(mean, has_voxel, lo, hi))
    return xp.stack(channels, axis=-1)


def subregion_band_projections(hu, mask, axis, bands=PAPER_BANDS, *, use_kernel: bool = True):
    """Band projections of the six sub-regions of a working volume: (6, H, W, len(bands)).

    On CuPy arrays one fused kernel (``kernels/project_bands.cu``) computes all six sub-regions
    and all bands in a single pass; elsewhere, or with ``use_kernel=False``, it is
    :func:`band_projection` per sub-region, the kernel's reference.
    """
    if use_kernel and is_cupy_array(hu):
        from ._gpu_kernels import project_bands_gpu

        # CuPy Backend: one kernel launch instead of 6 x len(bands) reductions.
        return project_bands_gpu(hu, mask, axis_index(axis, 3), bands)
    xp = backend_of(hu).xp
    slices = subregion_slices(hu.shape)
    return xp.stack([band_projection(hu[sl], mask[sl], axis, bands) for sl in slices.values()])


def _project_axes(hu, in_gray, in_band, axes, projection: ProjectionConfig, use_kernel: bool):
    """Whole-scan gray image and sub-region band images of one (rotated) volume, per axis."""
    gray, bands = {}, {}
    for name in axes:
        gray[name] = average_projection(hu, in_gray, name, projection.gray_window_hu)
        bands[name] = subregion_band_projections(
            hu, in_band, name, projection.bands, use_kernel=use_kernel
        )
    return gray, bands


def rotated_sample_coords(shape, angles_deg, xp):
    """(3, K, J, I) float32 input coordinates that the rotated volume's voxels sample.

    The fused kernel's arithmetic: x = M o + offset in float32, M = R^T (see inverse_rotation),
    summed in the kernel's order (offset, then the i, j, k terms).
    """
    matrix, offset = inverse_rotation(angles_deg, shape)
    m32, o32 = matrix.astype("float32"), offset.astype("float32")
    nk, nj, ni = shape
    k = xp.arange(nk, dtype=xp.float32)[:, None, None]
    j = xp.arange(nj, dtype=xp.float32)[None, :, None]
    i = xp.arange(ni, dtype=xp.float32)[None, None, :]
    rows = [o32[d] + m32[d, 2] * i + m32[d, 1] * j + m32[d, 0] * k for d in range(3)]
    return xp.stack([xp.broadcast_to(r, shape) for r in rows])


def _sample_twin(hu, conservative, refined, angles, geometry):
    """The fused kernel's sampling: trilinear HU; a mask holds where its trilinear value >= 0.5."""
    bk = backend_of(hu)
    coords = rotated_sample_coords(hu.shape, angles, bk.xp)

    def sample(volume, cval):
        return bk.ndi.map_coordinates(
            volume.astype(bk.xp.float32), coords, order=1, mode="constant", cval=cval
        )

    thr = geometry.mask_threshold
    values = sample(hu, geometry.fill_hu)
    return values, sample(conservative, 0.0) >= thr, sample(refined, 0.0) >= thr


def _sample_unfused(hu, conservative, refined, angles, geometry):
    """The reference: three rotate_volume calls (HU linear, masks linear + re-threshold)."""
    return tuple(rotate_volume(v, angles, config=geometry) for v in (hu, conservative, refined))


def rotate_project(
    hu,
    conservative,
    refined,
    rotations,
    *,
    axes=tuple(AXES),
    config=PAPER,
    method: str = "auto",
    progress=None,
):
    """Gray and sub-region band projections of every rotation of a working volume (paper 2.3).

    ``hu`` (float32 HU) and the two boolean masks are on the working grid. Returns
    ``(gray, bands)``: dicts over ``axes`` of ``(R, H, W)`` whole-scan gray images (conservative
    mask) and ``(R, 6, Hs, Ws, len(bands))`` sub-region band images (refined mask), R =
    len(rotations). ``method`` is ``fused`` (CuPy only), ``twin``, ``unfused`` or ``auto``
    (fused on the GPU, unfused on the CPU); they agree to float32 rounding (tests/test_projection).
    ``progress(stage, done, total)`` is called after each rotation (each axis when fused).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    gpu = is_cupy_array(hu)
    if method == "auto":
        method = "fused" if gpu else "unfused"
    if method == "fused":
        if not gpu:
            raise ValueError("method='fused' runs the CUDA kernel and needs CuPy arrays")
        from ._gpu_kernels import rotate_project_gpu

        return rotate_project_gpu(hu, conservative, refined, rotations, axes, config, progress)
    sampler = _sample_twin if method == "twin" else _sample_unfused
    xp = backend_of(hu).xp
    per_rotation = []
    for n, angles in enumerate(rotations):
        values, in_gray, in_band = sampler(hu, conservative, refined, angles, config.geometry)
        per_rotation.append(
            _project_axes(values, in_gray, in_band, axes, config.projection, method == "unfused")
        )
        if progress:
            progress("rotations", n + 1, len(rotations))
    gray = {a: xp.stack([g[a] for g, _ in per_rotation]) for a in axes}
    bands = {a: xp.stack([b[a] for _, b in per_rotation]) for a in axes}
    return gray, bands


__all__ = [
    "METHODS",
    "average_projection",
    "band_membership",
    "band_projection",
    "rotate_project",
    "rotated_sample_coords",
    "subregion_band_projections",
]
