"""Voxel grid in patient millimetres, smooth random fields and partial-volume painting helpers.

Phantoms are described in millimetres (patient frame, origin at the volume centre) and rendered
onto any grid, so one patient looks the same at 2.7 mm and at the paper's 0.9 mm (paper 1.1).
Points and axes are ordered like the arrays: ``(z, y, x)`` = ``(k, j, i)``, x toward the
patient's Left, y toward Posterior, z toward Superior (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The cohort's default field of view (mm): a chest from above the apices to the upper abdomen.
DEFAULT_SHAPE = (80, 128, 128)
DEFAULT_SPACING = (3.5, 2.7, 2.7)
DEFAULT_FOV_MM = tuple(n * s for n, s in zip(DEFAULT_SHAPE, DEFAULT_SPACING, strict=True))


@dataclass(frozen=True)
class Grid:
    """A CT grid: ``shape`` (k, j, i) voxels of ``spacing`` (dk, dj, di) mm, centred on 0."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def fov_mm(self) -> np.ndarray:
        return np.asarray(self.shape, float) * np.asarray(self.spacing, float)

    @property
    def voxel_mm(self) -> float:
        """Typical voxel edge, the width of a partial-volume edge."""
        return float(np.mean(self.spacing))

    def axis_mm(self, axis: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
        n, step = self.shape[axis], self.spacing[axis]
        index = np.arange(lo, n if hi is None else hi, dtype=np.float32)
        return (index - (n - 1) / 2.0) * np.float32(step)

    def coords(self, box: tuple[slice, slice, slice] | None = None):
        """Open (broadcastable) z, y, x coordinate arrays in mm of the voxels of ``box``."""
        box = box or tuple(slice(0, n) for n in self.shape)
        z, y, x = (self.axis_mm(a, s.start, s.stop) for a, s in enumerate(box))
        return z[:, None, None], y[None, :, None], x[None, None, :]

    def to_index(self, point_mm) -> np.ndarray:
        """Fractional (k, j, i) index of a (z, y, x) point in mm."""
        shape, spacing = np.asarray(self.shape, float), np.asarray(self.spacing, float)
        return np.asarray(point_mm, float) / spacing + (shape - 1) / 2.0

    def to_mm(self, index) -> np.ndarray:
        shape, spacing = np.asarray(self.shape, float), np.asarray(self.spacing, float)
        return (np.asarray(index, float) - (shape - 1) / 2.0) * spacing

    def box(self, lo_mm, hi_mm) -> tuple[slice, slice, slice] | None:
        """Index box covering the mm box [lo_mm, hi_mm]; None when it misses the grid."""
        lo = np.floor(self.to_index(lo_mm)).astype(int)
        hi = np.ceil(self.to_index(hi_mm)).astype(int) + 1
        lo, hi = np.maximum(lo, 0), np.minimum(hi, self.shape)
        if np.any(hi <= lo):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))

    def ball_box(self, center_mm, radius_mm: float):
        center = np.asarray(center_mm, float)
        return self.box(center - radius_mm, center + radius_mm)

    def chunks(self, max_voxels: int = 8_000_000):
        """k-slabs small enough to render a full-size (paper 432x512x512) volume in bounded RAM."""
        per_slice = self.shape[1] * self.shape[2]
        step = max(1, max_voxels // per_slice)
        for lo in range(0, self.shape[0], step):
            hi = min(self.shape[0], lo + step)
            yield (slice(lo, hi), slice(0, self.shape[1]), slice(0, self.shape[2]))


def default_spacing(shape) -> tuple[float, float, float]:
    """Spacing that keeps the default field of view for any ``shape`` (e.g. the paper grid)."""
    return tuple(round(f / n, 4) for f, n in zip(DEFAULT_FOV_MM, shape, strict=True))


class SmoothField:
    """A smooth random field in mm: a sum of separable cosine modes (values about in [-1, 1]).

    Defined in millimetres, so it is resolution independent, and evaluated as outer products of
    1-D factors, so it costs a few array operations per mode even on the paper's full grid.
    """

    def __init__(self, rng: np.random.Generator, wavelength_mm=(40.0, 120.0), n_modes: int = 6):
        lam = rng.uniform(*wavelength_mm, size=(n_modes, 3))
        self.k = (2 * np.pi / lam).astype(np.float32)
        self.phase = rng.uniform(0, 2 * np.pi, size=(n_modes, 3)).astype(np.float32)
        self.amp = (rng.normal(size=n_modes) * np.sqrt(2.0 / n_modes)).astype(np.float32)

    def __call__(self, z, y, x) -> np.ndarray:
        """Field on the open grid (z, y, x) (shapes (nz,1,1), (1,ny,1), (1,1,nx) or scalars).

        sum_m fz_m[k] fy_m[j] fx_m[i] is one matrix product, cheap even on the paper's grid.
        """
        z, y, x = (np.asarray(v, np.float32).reshape(-1) for v in (z, y, x))
        fz = self.amp[:, None] * np.cos(self.k[:, :1] * z + self.phase[:, :1])
        fy = np.cos(self.k[:, 1:2] * y + self.phase[:, 1:2])
        fx = np.cos(self.k[:, 2:3] * x + self.phase[:, 2:3])
        plane = (fy[:, :, None] * fx[:, None, :]).reshape(len(self.amp), -1)
        return (fz.T @ plane).reshape(len(z), len(y), len(x))


def soft_inside(signed_mm, edge_mm: float) -> np.ndarray:
    """Fraction of a voxel inside a surface from its signed distance (negative inside).

    A linear ramp one voxel wide approximates partial-volume averaging, so thin walls (paper's
    2-4 mm cavity walls at 2.7 mm voxels) stay visible instead of aliasing away.
    """
    return np.clip(0.5 - np.asarray(signed_mm, np.float32) / np.float32(edge_mm), 0.0, 1.0)


def segment_distance(z, y, x, a, b) -> np.ndarray:
    """Distance (mm) of the voxels (open grids z, y, x) to the segment a -> b."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    d = b - a
    length2 = float(d @ d) or 1e-6
    t = ((z - a[0]) * d[0] + (y - a[1]) * d[1] + (x - a[2]) * d[2]) / np.float32(length2)
    t = np.clip(t, 0.0, 1.0)
    return np.sqrt(
        (z - a[0] - t * d[0]) ** 2 + (y - a[1] - t * d[1]) ** 2 + (x - a[2] - t * d[2]) ** 2
    )


def tube_fraction(dist_mm, radius_mm: float, edge_mm: float) -> np.ndarray:
    """Partial-volume fraction of a tube; tubes thinner than a voxel fade instead of vanishing.

    The cross-section is kept (radius**2 scaled by the visible radius**2), so small peripheral
    vessels look faint, as on real CT, rather than a voxel wide and fully dense.
    """
    visible = max(radius_mm, 0.5 * edge_mm)
    return soft_inside(dist_mm - visible, edge_mm) * np.float32((radius_mm / visible) ** 2)


def blend(target: np.ndarray, box, fraction: np.ndarray, value) -> None:
    """target[box] <- (1 - f) * target[box] + f * value, in place."""
    view = target[box]
    view += fraction * (np.asarray(value, np.float32) - view)
