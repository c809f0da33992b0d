"""One CT scan to all of its projections (paper 2.1-2.3): :func:`preprocess_scan`.

Masks (conservative and refined, paper 2.1) -> lung bounding box of the refined mask -> one
resampling to the working grid -> 27 rotations x 3 axes of whole-scan gray images and sub-region
band images -> NumPy. On the GPU everything stays on the device until the single copy back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..backend import backend_of, get_backend, to_numpy
from ..config import AXES, PAPER, SIGNS, PreprocessConfig
from ._geometry import geometry_config, grid_mapping, lung_bbox, resample_to_grid
from ._projection import rotate_project
from ._subregions import axis_index, subregion_fractions, subregion_slices

MASK_METHODS = ("conservative", "refined")


@dataclass(frozen=True)
class ScanProjections:
    """Everything the cache keeps of one scan (``docs/ARCHITECTURE.md``), as NumPy arrays.

    gray[axis]:    float32 (27, H, W)        whole-scan grayscale, conservative mask, in [0, 1]
    bands[axis]:   float32 (27, 6, Hs, Ws, 3) sub-region HU-band images, refined mask, in [0, 1]
    lesions[axis]: uint8 (6, Hs, Ws, 3) or None: 1 where the unrotated ray meets each sign
    qc:            lung volumes (mL), refined-lung fraction per sub-region, implausible flag
    mapping:       crop box and scale, working grid -> CT voxels (``working_to_ct``), JSON-able
    rotations:     the 27 (about-k, about-j, about-i) angle triples, in gray/bands order
    masks:         CT-grid boolean masks {"conservative", "refined"}, only with keep_masks=True
    """

    gray: dict[str, np.ndarray]
    bands: dict[str, np.ndarray]
    lesions: dict[str, np.ndarray] | None
    qc: dict
    mapping: dict
    rotations: tuple[tuple[float, float, float], ...]
    masks: dict[str, np.ndarray] | None = None


def _lung_masks(hu, spacing, *, methods, config, backend) -> dict:
    """The segmentation stage's masks (``_mask.lung_masks``); tests may replace this hook."""
    from ._mask import lung_masks

    return lung_masks(hu, spacing, methods=methods, config=config, backend=backend)


def _report(progress, stage: str, done: int = 1, total: int = 1) -> None:
    if progress:
        progress(stage, done, total)


def lung_volume_ml(mask, spacing) -> float:
    """Volume of a boolean mask in mL (spacing in mm; 1 mL = 1000 mm^3)."""
    return float(mask.sum()) * float(np.prod(spacing)) / 1000.0


def scan_qc(masks: dict, working_refined, spacing, geometry) -> dict:
    """Numbers that expose a failed segmentation (it does not raise, it projects wrong tissue)."""
    volumes = {name: lung_volume_ml(m, spacing) for name, m in masks.items()}
    low, high = geometry.plausible_lung_ml
    return {
        "lung_volume_ml": volumes["refined"],
        "conservative_volume_ml": volumes["conservative"],
        "refined_volume_ml": volumes["refined"],
        # Paper 2.3 thirds are thirds of the lungs only if the box is: shares should be balanced.
        "subregion_fraction": subregion_fractions(working_refined),
        "lung_volume_implausible": not all(low <= v <= high for v in volumes.values()),
    }


def lesion_projections(labels, spacing, bbox, geometry, axes=tuple(AXES)) -> dict:
    """uint8 (6, Hs, Ws, 3) per axis: 1 where the unrotated ray meets sign c in that sub-region.

    ``labels`` is on the CT grid (1 cavity, 2 fungus ball, 3 pleural thickening; ARCHITECTURE
    manifest). A working voxel holds a sign when any CT voxel it overlaps does: resampling (point
    sampling) missed lesions thinner than a working voxel, such as pleural sheets.
    """
    xp = backend_of(labels).xp
    mapping = grid_mapping(labels.shape, spacing, bbox, geometry_config(geometry).working_shape)
    signs = [_any_under_working_voxels(labels == c + 1, mapping) for c in range(len(SIGNS))]
    slices = subregion_slices(signs[0].shape)
    out = {}
    for name in axes:
        a = axis_index(name)
        per_sub = [xp.stack([s[sl].any(axis=a) for s in signs], axis=-1) for sl in slices.values()]
        out[name] = xp.stack(per_sub).astype(xp.uint8)
    return out


def _any_under_working_voxels(sign, mapping):
    """Boolean working-grid volume: True where the working voxel overlaps a True CT voxel of
    the crop box. Working voxel w spans crop coordinates [w * scale, (w + 1) * scale) (the
    mapping of :func:`resample_to_grid`); one axis at a time, a difference of cumulative sums
    tells whether its CT voxels hold any True."""
    xp = backend_of(sign).xp
    box = tuple(
        slice(a, b) for a, b in zip(mapping["crop_start"], mapping["crop_stop"], strict=True)
    )
    out = sign[box]
    for axis, (n, scale) in enumerate(zip(mapping["working_shape"], mapping["scale"], strict=True)):
        edges = np.arange(n + 1) * scale
        first = np.floor(edges[:-1] + 1e-6).astype(np.int64)
        stop = np.maximum(np.ceil(edges[1:] - 1e-6).astype(np.int64), first + 1)
        counts = xp.cumsum(out, axis=axis, dtype=xp.int32)
        zero = xp.zeros_like(xp.take(counts, xp.asarray([0]), axis=axis))
        counts = xp.concatenate([zero, counts], axis=axis)  # counts[m]: True among the first m
        out = xp.take(counts, xp.asarray(stop), axis=axis) > xp.take(
            counts, xp.asarray(first), axis=axis
        )
    return out


def _both_masks(hu, spacing, config: PreprocessConfig, bk, progress) -> dict:
    """Conservative (gray images) and refined (band images) lung masks on the CT grid.

    One ``lung_masks`` call: both masks share their internal markers (paper 2.1).
    """
    masks = _lung_masks(hu, spacing, methods=MASK_METHODS, config=config.segmentation, backend=bk)
    _report(progress, "masks")
    return {kind: bk.asarray(masks[kind]).astype(bool) for kind in MASK_METHODS}


def _host(arrays: dict | None) -> dict | None:
    return None if arrays is None else {name: to_numpy(a) for name, a in arrays.items()}


def preprocess_scan(
    hu,
    spacing,
    *,
    config: PreprocessConfig = PAPER,
    backend=None,
    lesion_labels=None,
    progress: Callable[[str, int, int], None] | None = None,
    method: str = "auto",
    keep_masks: bool = False,
) -> ScanProjections:
    """All projections of one CT (``hu[k, j, i]`` in HU, ``spacing`` (dk, dj, di) mm), paper 2.

    ``backend`` is a name or Backend (None: ``$SAPSAM_BACKEND``); ``lesion_labels`` an optional
    label map on the CT grid; ``progress(stage, done, total)`` is told of each stage;
    ``method`` picks the rotate+project path (``rotate_project``: fused kernel on the GPU).
    """
    bk, geometry = get_backend(backend), config.geometry
    hu = bk.asarray(hu)
    masks = _both_masks(hu, spacing, config, bk, progress)
    # The refined mask's box: sub-region thirds and halves are then those of the lungs.
    bbox = lung_bbox(masks["refined"], spacing, geometry.bbox_margin_mm)
    work_hu, mapping = resample_to_grid(hu, spacing, bbox, geometry, order=1)
    work = {kind: resample_to_grid(m, spacing, bbox, geometry)[0] for kind, m in masks.items()}
    _report(progress, "resample")
    rotations = tuple(tuple(float(a) for a in r) for r in geometry.rotations())
    gray, bands = rotate_project(
        work_hu, work["conservative"], work["refined"], rotations,
        config=config, method=method, progress=progress,
    )  # fmt: skip
    lesions = None
    if lesion_labels is not None:
        lesions = lesion_projections(bk.asarray(lesion_labels), spacing, bbox, geometry)
        _report(progress, "lesions")
    # The device -> host copies happen here, once per result array.
    return ScanProjections(
        gray=_host(gray),
        bands=_host(bands),
        lesions=_host(lesions),
        qc=scan_qc(masks, work["refined"], spacing, geometry),
        mapping=mapping,
        rotations=rotations,
        masks=_host(masks) if keep_masks else None,
    )


__all__ = ["MASK_METHODS", "ScanProjections", "lesion_projections", "preprocess_scan", "scan_qc"]
