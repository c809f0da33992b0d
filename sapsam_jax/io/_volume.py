"""The CT volume every reader returns, and the one place orientation is made canonical.

Canonical order is ``hu[k, j, i]`` with ``i`` toward the patient's Left, ``j`` toward Posterior
and ``k`` toward Superior (DICOM LPS); see docs/ARCHITECTURE.md. Readers describe the array as the
file stores it plus a 4x4 affine from those native indices to LPS mm, and
:func:`to_canonical` permutes and flips both so that downstream code never looks at a header.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# A scan within this angle of the patient axes is treated as axis-aligned (its exact affine is
# kept, so overlays stay right). The paper augments with +-5 degree rotations (paper 2.3), so a
# sub-degree tilt is well inside what the models already see; anything larger would be resliced
# silently by a permute/flip, so it is refused instead.
OBLIQUE_TOLERANCE_DEG = 1.0
# NIfTI stores RAS; DICOM and this package use LPS. The same matrix converts both ways.
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
HU_DTYPE = np.int16


class CTLoadError(ValueError):
    """A CT file or folder could not be read; the message names the path and the problem."""


@dataclass(frozen=True, eq=False)
class CTVolume:
    """A CT scan in canonical orientation.

    ``hu``: ``np.int16`` Hounsfield units, ``hu[k, j, i]`` (i -> Left, j -> Posterior,
    k -> Superior). ``spacing``: ``(dk, dj, di)`` in mm. ``affine``: 4x4, ``(k, j, i, 1)`` -> LPS
    patient mm. ``meta``: study/series UIDs, scanner, kernel, spacing, slice count, source path;
    never patient-identifying fields.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)

    def index_to_lps(self, kji) -> np.ndarray:
        """LPS patient mm of voxel indices ``kji`` (shape ``(..., 3)``, fractional allowed)."""
        kji = np.asarray(kji, dtype=np.float64)
        return kji @ self.affine[:3, :3].T + self.affine[:3, 3]


def axis_directions(affine: np.ndarray) -> np.ndarray:
    """Unit direction (columns) of each voxel axis of a 4x4 affine."""
    columns = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(columns, axis=0)
    if np.any(norms == 0) or not np.all(np.isfinite(columns)):
        raise ValueError(f"degenerate affine (zero or non-finite axis): {columns.tolist()}")
    return columns / norms


def check_axis_aligned(affine: np.ndarray, source) -> np.ndarray:
    """Patient axis (0=L, 1=P, 2=S) of each voxel axis; CTLoadError if the grid is oblique."""
    try:
        directions = axis_directions(affine)
    except ValueError as err:
        raise CTLoadError(f"{source}: {err}") from None
    patient_axis = np.argmax(np.abs(directions), axis=0)
    cosines = np.abs(directions[patient_axis, range(3)])
    worst_deg = float(np.degrees(np.arccos(np.clip(cosines.min(), -1.0, 1.0))))
    if worst_deg > OBLIQUE_TOLERANCE_DEG or len(set(patient_axis.tolist())) != 3:
        raise CTLoadError(
            f"{source}: oblique acquisition, voxel axes are up to {worst_deg:.1f} degrees off the "
            f"patient axes (limit {OBLIQUE_TOLERANCE_DEG} degrees; direction cosines "
            f"{np.round(directions, 4).T.tolist()}); reslice it to an axis-aligned grid first"
        )
    return patient_axis


def to_canonical(array: np.ndarray, affine: np.ndarray, source) -> tuple[np.ndarray, np.ndarray]:
    """Permute and flip ``array`` (first three axes) so that its axes are (S, P, L) = (k, j, i).

    ``affine`` maps the native indices of ``array`` to LPS mm; the returned affine maps the
    canonical indices to the same points, so no voxel moves in the world.
    """
    patient_axis = check_axis_aligned(affine, source)
    # Canonical axis c holds patient axis 2 - c: k <- S (2), j <- P (1), i <- L (0).
    # order[c] is the native axis that becomes canonical axis c.
    order = [int(np.flatnonzero(patient_axis == lps)[0]) for lps in (2, 1, 0)]
    array = np.transpose(array, order + list(range(3, array.ndim)))
    affine = np.asarray(affine, dtype=np.float64)[:, order + [3]].copy()
    for canonical in range(3):
        lps = 2 - canonical
        if affine[lps, canonical] < 0:
            # Reverse the axis: the old last voxel becomes index 0, so the origin moves there.
            array = np.flip(array, axis=canonical)
            affine[:3, 3] += affine[:3, canonical] * (array.shape[canonical] - 1)
            affine[:3, canonical] *= -1
    return np.ascontiguousarray(array), affine + 0.0  # + 0.0 turns the flips' -0.0 into 0.0


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size (mm) along each array axis of ``affine``."""
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def to_hu_int16(values: np.ndarray) -> np.ndarray:
    """Round and clip to int16 HU; integer input in range is cast without a float copy."""
    if values.dtype == HU_DTYPE:
        return values
    info = np.iinfo(HU_DTYPE)
    if np.issubdtype(values.dtype, np.integer):
        return np.clip(values, info.min, info.max).astype(HU_DTYPE)
    return np.clip(np.rint(values), info.min, info.max).astype(HU_DTYPE)


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, for a moment, for every thread)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """Permissions a plain ``open``/``mkdir`` would give under the process umask.

    ``tempfile.mkstemp``/``mkdtemp`` create owner-only (0600/0700) entries; renamed into place
    they would lock other users (a shared data folder, a container's other uid) out of the files.
    """
    return (0o777 if directory else 0o666) & ~_umask()


@contextmanager
def atomic_path(path, suffix: str = ""):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Readers therefore see either the old file or the complete new one, never a half-written one;
    the file is synced before the rename, so a power cut after it cannot leave it empty either.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, default_mode())
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
