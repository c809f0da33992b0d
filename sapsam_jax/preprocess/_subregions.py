"""The six lung sub-regions of paper 1.2 as fixed slices of the working volume (paper 2.3).

The working volume is the lung bounding box resampled to ``GeometryConfig.working_shape``, so
its thirds along ``k`` and halves along ``i`` are thirds and halves of the lungs
(``docs/ARCHITECTURE.md``): ``i >= W/2`` is the patient's left (``i`` runs toward Left), the
highest ``k`` third is upper (``k`` runs toward Superior). On the paper grid each is
(72, 256, 128) voxels, the paper's 256x128x72.
"""

from __future__ import annotations

from ..config import AXES, SUBREGIONS


def subregion_shape(working_shape) -> tuple[int, int, int]:
    """(k, j, i) size of one sub-region: a third along k, a half along i."""
    k, j, i = working_shape
    return (k // 3, j, i // 2)


def subregion_slices(working_shape) -> dict[str, tuple[slice, slice, slice]]:
    """``{name: (slice_k, slice_j, slice_i)}`` in ``config.SUBREGIONS`` order.

    Thirds start at k = 0 (lower); a remainder when ``K`` is not a multiple of 3 (never on the
    presets) is left out at the top, as is the last column of an odd ``W``.
    """
    dk, _, di = subregion_shape(working_shape)
    levels = {"lower": 0, "middle": 1, "upper": 2}
    sides = {"right": 0, "left": 1}  # i < W/2 is the patient's right
    out = {}
    for name in SUBREGIONS:
        side, level = name.split("_")
        k0, i0 = levels[level] * dk, sides[side] * di
        out[name] = (slice(k0, k0 + dk), slice(None), slice(i0, i0 + di))
    return out


def subregion_image_shape(working_shape, axis) -> tuple[int, int]:
    """(H, W) of a sub-region's projection along ``axis`` (the two remaining axes, in order)."""
    shape = subregion_shape(working_shape)
    a = axis_index(axis, 3)
    return tuple(n for d, n in enumerate(shape) if d != a)


def axis_index(axis, ndim: int = 3) -> int:
    """Array axis of ``axis``: a name in ``config.AXES`` (3-D only) or an int."""
    if isinstance(axis, str):
        if ndim != 3:
            raise ValueError(f"named axis {axis!r} needs a 3-D volume, got {ndim}-D")
        try:
            return AXES[axis]
        except KeyError:
            raise ValueError(f"unknown axis {axis!r}; expected one of {', '.join(AXES)}") from None
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for a {ndim}-D volume")
    return axis % ndim


def subregion_fractions(mask) -> dict[str, float]:
    """Fraction of the mask's voxels inside each sub-region (QC: the thirds are of the lungs)."""
    total = float(mask.sum())
    slices = subregion_slices(mask.shape)
    return {name: float(mask[sl].sum()) / total if total else 0.0 for name, sl in slices.items()}


__all__ = [
    "axis_index",
    "subregion_fractions",
    "subregion_image_shape",
    "subregion_shape",
    "subregion_slices",
]
