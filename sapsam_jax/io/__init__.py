"""CT in: ``load_ct`` (DICOM series, multi-frame DICOM, NIfTI) -> canonical ``CTVolume``;
``save_nifti`` for arrays on a CT's grid; the cohort manifest (CSV) reader and writer.

Canonical orientation (docs/ARCHITECTURE.md): ``hu[k, j, i]``, i -> patient Left,
j -> Posterior, k -> Superior (DICOM LPS); ``affine`` maps ``(k, j, i, 1)`` to LPS mm.
"""

from ._load import load_ct
from ._manifest import (
    Manifest,
    ManifestError,
    Study,
    manifest_columns,
    read_manifest,
    write_manifest,
)
from ._nifti import save_nifti
from ._volume import CTLoadError, CTVolume

__all__ = [
    "CTLoadError",
    "CTVolume",
    "Manifest",
    "ManifestError",
    "Study",
    "load_ct",
    "manifest_columns",
    "read_manifest",
    "save_nifti",
    "write_manifest",
]
