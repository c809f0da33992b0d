"""``load_ct``: one entry point for DICOM folders, multi-frame DICOM files and NIfTI files."""

from __future__ import annotations

import os
from pathlib import Path

from ._dicom import DICOM_SUFFIXES, is_dicom_file, read_dicom
from ._nifti import NIFTI_SUFFIXES, nifti_suffix, read_nifti
from ._volume import CTLoadError, CTVolume


def load_ct(
    path: str | os.PathLike, *, series_uid: str | None = None, allow_gaps: bool = False
) -> CTVolume:
    """Read a CT scan into canonical orientation (``hu[k, j, i]``: i -> Left, j -> Posterior,
    k -> Superior; int16 HU).

    ``path`` is a DICOM series folder, a single multi-frame DICOM file, or a NIfTI file
    (``.nii``/``.nii.gz``). ``series_uid`` picks one series from a folder holding several.
    ``allow_gaps=True`` interpolates linearly across missing or unevenly spaced DICOM slices
    (with a warning) instead of raising. Every failure raises :class:`CTLoadError` naming the
    file or folder and the problem.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CTLoadError(f"{path}: no such file or folder")
    if path.is_dir():
        return read_dicom(path, series_uid, allow_gaps)
    if nifti_suffix(path) is not None:
        if series_uid is not None:
            raise CTLoadError(f"{path}: series_uid applies to DICOM folders, not NIfTI files")
        return read_nifti(path)
    if is_dicom_file(path) or path.suffix.lower() in DICOM_SUFFIXES:
        return read_dicom(path, series_uid, allow_gaps)
    raise CTLoadError(
        f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; expected a DICOM "
        f"series folder, a multi-frame DICOM file ({', '.join(DICOM_SUFFIXES)} or any file with "
        f"the DICOM marker) or NIfTI ({', '.join(NIFTI_SUFFIXES)})"
    )
