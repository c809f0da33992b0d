"""NIfTI CT in (``.nii``, ``.nii.gz``) and any array on a CT's grid out, with RAS affines."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from ..backend import to_numpy
from ._volume import (
    LPS_FROM_RAS,
    CTLoadError,
    CTVolume,
    atomic_path,
    spacing_of,
    to_canonical,
    to_hu_int16,
)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# NIfTI xform code "scanner anatomical": the affine gives the scanner's patient coordinates.
_XFORM_SCANNER = 1
# (i, j, k, 1) <-> (k, j, i, 1): files store the column index fastest, as DICOM converters do.
_SWAP_KJI = np.eye(4)[[2, 1, 0, 3]]


def nifti_suffix(path: Path) -> str | None:
    """'.nii' or '.nii.gz' when ``path`` names a NIfTI file, else None."""
    name = path.name.lower()
    return next((s for s in reversed(NIFTI_SUFFIXES) if name.endswith(s)), None)


def read_nifti(path: Path) -> CTVolume:
    """Read a 3-D NIfTI CT, refusing files without orientation, NaNs or truncated data."""
    image = _open(path)
    data = _data(image, path)
    ras = _affine_in_mm(image)
    hu, affine = to_canonical(to_hu_int16(data), LPS_FROM_RAS @ ras, path)
    meta = {
        "format": "nifti",
        "source_path": str(path),
        "study_uid": None,
        "series_uid": None,
        "series_description": None,
        "manufacturer": None,
        "scanner_model": None,
        "convolution_kernel": None,
        "slice_thickness_mm": None,
        "spacing": spacing_of(affine),
        "shape": tuple(hu.shape),
        "slice_count": int(hu.shape[0]),
        "interpolated_slices": 0,
    }
    return CTVolume(hu=hu, spacing=spacing_of(affine), affine=affine, meta=meta)


def _open(path: Path):
    """nibabel image with a usable 3-D shape and orientation (header only, data not read yet)."""
    try:
        image = nib.load(path)
    except Exception as err:  # nibabel raises ImageFileError, OSError, EOFError, ...
        raise CTLoadError(f"{path}: cannot read NIfTI, file truncated or corrupt ({err})") from None
    shape = image.shape
    # A trailing singleton 4th dimension (one time point) is still a volume.
    if len(shape) > 3 and all(n == 1 for n in shape[3:]):
        shape = shape[:3]
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise CTLoadError(f"{path}: a 2-D image (shape {image.shape}), not a CT volume")
    if len(shape) > 3:
        raise CTLoadError(f"{path}: {len(shape)}-D image (shape {image.shape}), expected 3-D CT")
    header = image.header
    if int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
        raise CTLoadError(
            f"{path}: no orientation (qform_code and sform_code are both 0), so left and right "
            "cannot be told apart; fix the header (e.g. re-export it from DICOM)"
        )
    return image


# NIfTI spatial units (xyzt_units) in mm; "unknown" is taken as mm, as every viewer does.
_MM_PER_UNIT = {"mm": 1.0, "unknown": 1.0, "meter": 1000.0, "micron": 0.001}


def _affine_in_mm(image) -> np.ndarray:
    """The image's affine in mm: a header in meters (some converters) would give a lung a few
    millimetres wide, which segmentation and resampling take at its word."""
    unit = image.header.get_xyzt_units()[0]
    affine = np.array(image.affine, dtype=np.float64)
    affine[:3] *= _MM_PER_UNIT.get(unit, 1.0)
    return affine


def _data(image, path: Path) -> np.ndarray:
    """Voxel values (scl_slope/inter applied), checked for truncation and NaN/inf."""
    try:
        data = np.asanyarray(image.dataobj)
    except (EOFError, OSError, ValueError, zlib.error, gzip.BadGzipFile) as err:
        raise CTLoadError(f"{path}: voxel data truncated or corrupt ({err})") from None
    data = data.reshape(data.shape[:3])
    if np.issubdtype(data.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise CTLoadError(f"{path}: {bad} voxel(s) are NaN or infinite; not a valid CT in HU")
    elif not np.issubdtype(data.dtype, np.integer):
        raise CTLoadError(f"{path}: unsupported voxel type {data.dtype} for CT")
    return data


def _nifti_array(volume, shape) -> np.ndarray:
    """Host array in a NIfTI-friendly dtype, checked to lie on the CT grid."""
    array = to_numpy(volume)
    if tuple(array.shape[:3]) != tuple(shape):
        raise ValueError(f"array shape {array.shape} is not on the CT grid {tuple(shape)}")
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype in (np.int64, np.uint64):
        # nibabel refuses 64-bit integers without an explicit type; labels fit in int32.
        info = np.iinfo(np.int32)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise ValueError("64-bit integer values do not fit NIfTI int32")
        return array.astype(np.int32)
    return array


def save_nifti(path, volume_kji, ct: CTVolume) -> Path:
    """Write ``volume_kji`` (an array on ``ct``'s grid, ``[k, j, i, ...]``) as NIfTI.

    The file stores the column index ``i`` fastest with the RAS affine of ``ct``, as DICOM
    converters do, so viewers overlay it on the original scan and :func:`load_ct` reads it back
    to the same canonical array. Written to a temporary file and renamed (atomic).
    """
    path = Path(path)
    suffix = nifti_suffix(path)
    if suffix is None:
        raise ValueError(f"{path}: NIfTI file names end in .nii or .nii.gz")
    array = _nifti_array(volume_kji, ct.hu.shape)
    array = np.transpose(array, (2, 1, 0) + tuple(range(3, array.ndim)))
    ras = np.linalg.inv(LPS_FROM_RAS) @ ct.affine @ _SWAP_KJI
    image = nib.Nifti1Image(array, ras)
    image.set_qform(ras, code=_XFORM_SCANNER)
    image.set_sform(ras, code=_XFORM_SCANNER)
    image.header.set_xyzt_units(xyz="mm")
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(image, tmp)
    return path
