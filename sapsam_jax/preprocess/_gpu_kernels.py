"""Launchers of the projection kernels in ``kernels/project_bands.cu`` (paper 2.2-2.3).

Each kernel is specialised by a ``#define`` preamble (axis, working shape, HU dtype, bands) and
compiled once per device and set of static parameters by ``_kernels.load_kernel``.
:func:`kernel_defines` needs no CuPy, so the tests compile the exact source with ``nvcc --ptx``
(``_kernels.kernel_source``). NumPy twins: ``_projection.subregion_band_projections`` with
``use_kernel=False`` (kernel 1) and ``_projection.rotate_project(method="twin")`` (kernel 2).
"""

from __future__ import annotations

import numpy as np

from ..config import PAPER_BANDS, GeometryConfig
from ._geometry import inverse_rotation
from ._kernels import load_kernel
from ._subregions import subregion_image_shape

KERNEL_FILE = "project_bands.cu"
PROJECT_BANDS = "sapsam_project_bands_3d"  # kernel 1, already-rotated volumes
ROTATE_PROJECT = "sapsam_rotate_project_bands_3d"  # kernel 2, rotation fused with projection
_HU_TYPES = {"float32": ("float", "f32"), "int16": ("short", "i16")}
_THREADS = 128  # rays per block; one thread walks one ray


def _c_float(x: float) -> str:
    return f"{float(x)!r}f"


def _c_list(values) -> str:
    return "{" + ", ".join(_c_float(v) for v in values) + "}"


def kernel_defines(
    axis: int,
    working_shape,
    hu_dtype="float32",
    bands=PAPER_BANDS,
    *,
    fill_hu: float = GeometryConfig.fill_hu,
    mask_threshold: float = GeometryConfig.mask_threshold,
) -> tuple[tuple[str, str], ...]:
    """The preamble's (name, value) pairs: hashable, so they key the module cache."""
    c_type, suffix = _HU_TYPES[np.dtype(hu_dtype).name]
    nk, nj, ni = (int(n) for n in working_shape)
    if min(nk, nj, ni) < 3 or nk // 3 < 1 or ni // 2 < 1:
        raise ValueError(f"working shape {working_shape} is too small for six sub-regions")
    return (
        ("AXIS", str(int(axis))),
        ("NK", str(nk)),
        ("NJ", str(nj)),
        ("NI", str(ni)),
        ("HU_T", c_type),
        ("SAPSAM_NAME(base)", f"base##_{suffix}"),
        ("NBANDS", str(len(bands))),
        ("BAND_LO", _c_list(lo for lo, _ in bands)),
        ("BAND_HI", _c_list(hi for _, hi in bands)),
        ("FILL_HU", _c_float(fill_hu)),
        ("MASK_THRESHOLD", _c_float(mask_threshold)),
    )


def kernel_name(base: str, defines) -> str:
    """The extern "C" name ``SAPSAM_NAME(base)`` expands to, e.g. sapsam_project_bands_3d_f32."""
    suffix = dict(defines)["SAPSAM_NAME(base)"].split("##_")[1]
    return f"{base}_{suffix}"


def get_kernel(base: str, defines):
    """The compiled kernel ``base`` for ``defines`` on the current device (memoized)."""
    return load_kernel(KERNEL_FILE, kernel_name(base, defines), defines)


def _grid(axis: int, working_shape, batch: int) -> tuple[int, int]:
    h, w = (n for d, n in enumerate(working_shape) if d != axis)
    return ((h * w + _THREADS - 1) // _THREADS, batch)


def project_bands_gpu(hu, mask, axis: int, bands=PAPER_BANDS):
    """Kernel 1: (6, Hs, Ws, len(bands)) sub-region band images of one working volume."""
    import cupy

    hu_dtype = "int16" if hu.dtype == cupy.int16 else "float32"
    _check_same_shape(hu, mask=mask)  # the kernel indexes the mask with hu's shape
    hu = cupy.ascontiguousarray(hu, dtype=hu_dtype)
    mask = cupy.ascontiguousarray(mask, dtype=cupy.bool_).view(cupy.uint8)
    defines = kernel_defines(axis, hu.shape, hu_dtype, bands)
    out = cupy.zeros((6, *subregion_image_shape(hu.shape, axis), len(bands)), cupy.float32)
    kernel = get_kernel(PROJECT_BANDS, defines)
    kernel(_grid(axis, hu.shape, 1), (_THREADS,), (hu, mask, out))
    return out


def _check_same_shape(hu, **masks) -> None:
    for name, mask in masks.items():
        if tuple(mask.shape) != tuple(hu.shape):
            raise ValueError(f"{name} mask has shape {tuple(mask.shape)}, hu {tuple(hu.shape)}")


def rotation_affines(rotations, shape) -> np.ndarray:
    """(R, 12) float32: per rotation the inverse matrix (row-major) then the offset."""
    rows = []
    for angles in rotations:
        matrix, offset = inverse_rotation(angles, shape)
        rows.append(np.concatenate([matrix.ravel(), offset]))
    return np.asarray(rows, dtype=np.float32)


def rotate_project_gpu(hu, conservative, refined, rotations, axes, config, progress=None):
    """Kernel 2: rotation fused with projection; same outputs as ``rotate_project``."""
    import cupy

    from ..config import AXES

    geometry, projection = config.geometry, config.projection
    _check_same_shape(hu, conservative=conservative, refined=refined)
    hu = cupy.ascontiguousarray(hu, dtype=cupy.float32)
    # Both masks in one byte: one load per corner serves the gray and the band projections.
    # C order is what the kernel indexes; CuPy does not promise it for elementwise results.
    masks = cupy.ascontiguousarray(
        conservative.astype(cupy.uint8) | (refined.astype(cupy.uint8) << 1)
    )
    affines = cupy.asarray(rotation_affines(rotations, hu.shape))
    nrot, nb = len(rotations), len(projection.bands)
    gray, bands = {}, {}
    for n, name in enumerate(axes):
        axis = AXES[name]
        defines = kernel_defines(
            axis,
            hu.shape,
            "float32",
            projection.bands,
            fill_hu=geometry.fill_hu,
            mask_threshold=geometry.mask_threshold,
        )
        image = tuple(s for d, s in enumerate(hu.shape) if d != axis)
        gray[name] = cupy.zeros((nrot, *image), cupy.float32)
        sub_image = subregion_image_shape(hu.shape, axis)
        bands[name] = cupy.zeros((nrot, 6, *sub_image, nb), cupy.float32)
        kernel = get_kernel(ROTATE_PROJECT, defines)
        lo, hi = (np.float32(v) for v in projection.gray_window_hu)
        args = (hu, masks, affines, gray[name], bands[name], lo, hi)
        kernel(_grid(axis, hu.shape, nrot), (_THREADS,), args)
        if progress:
            progress("rotations", n + 1, len(axes))
    return gray, bands


__all__ = [
    "get_kernel",
    "kernel_defines",
    "kernel_name",
    "project_bands_gpu",
    "rotate_project_gpu",
    "rotation_affines",
]
