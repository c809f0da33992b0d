"""Figures like the paper's Fig. 3: a map over its projection and over the CT slice it points at.

Matplotlib's object API on an Agg canvas (no global backend state, safe in scripts and tests).
Titles carry the study id, sign, sub-region, view and score only, never patient names (the CT
header is not read here). Display conventions (docs/ARCHITECTURE.md): axial images are shown as
stored (patient right on the left, anterior up, the radiological view); coronal and sagittal
images have ``k`` flipped so the head is up. Pixels are drawn at their physical aspect ratio.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sapsam_jax.config import AXES
from sapsam_jax.io._volume import atomic_path

# Lung window (level -600 HU, width 1500 HU), the usual reading window for lung CT.
LUNG_WINDOW_HU = (-1350.0, 150.0)
CAM_CMAP = "jet"
CAM_ALPHA = 0.45
# Overlay voxels below this share of the map's maximum stay transparent (the scan shows through).
OVERLAY_FLOOR = 0.05


def figure_title(study_id: str, label: str, subregion: str | None, view: str, score=None) -> str:
    """``study | sign | sub-region | view | p=...``: what a reader needs, nothing personal."""
    parts = [str(study_id), label.replace("_", " "), (subregion or "whole scan").replace("_", " ")]
    parts.append(view)
    if score is not None:
        parts.append(f"p={float(score):.2f}")
    return " | ".join(parts)


def save_fig3(
    path: str | os.PathLike,
    *,
    image,
    cam,
    axis: str,
    ct_slice,
    overlay,
    title: str,
    image_spacing=(1.0, 1.0),
    ct_spacing=(1.0, 1.0),
    map_name: str = "Grad-CAM",
) -> Path:
    """Three panels: projection + map, the axial CT slice, the slice + back-projected map.

    ``image`` (H, W, 3) band image or (H, W[, 1]) gray in [0, 1]; ``cam`` (H, W) map on that
    image; ``ct_slice`` (J, I) HU and ``overlay`` (J, I) the back-projected map on it (paper
    Fig. 3 shows the slice and the slice with the Grad-CAM). Spacings are (row, col) mm;
    ``map_name`` labels the map (e.g. "HiResCAM, block2_conv2").
    """
    fig = Figure(figsize=(13.5, 4.8), layout="constrained")
    axes = fig.subplots(1, 3)
    flip = AXES[axis] != 0
    _show_image(axes[0], image, image_spacing, flip)
    mappable = _show_map(axes[0], _unit(cam), image_spacing, flip)
    axes[0].set_title(f"{axis} projection + {map_name}")
    _show_ct(axes[1], ct_slice, ct_spacing)
    axes[1].set_title("axial CT slice")
    _show_ct(axes[2], ct_slice, ct_spacing)
    _show_map(axes[2], _unit(overlay), ct_spacing, False, floor=OVERLAY_FLOOR)
    axes[2].set_title("slice + back-projected map")
    fig.colorbar(mappable, ax=axes.tolist(), shrink=0.85, label="activation (normalised)")
    fig.suptitle(title)
    return _save(fig, path)


def save_psam3d_figure(
    path: str | os.PathLike, *, hu, psam, peak_index, spacing, title: str
) -> Path:
    """Axial, coronal and sagittal CT slices through the 3-D PSAM maximum, PSAM overlaid.

    ``hu`` and ``psam`` are CT-grid volumes (k, j, i); ``peak_index`` a CT voxel (k, j, i);
    ``spacing`` (dk, dj, di) mm. A cross marks the maximum.
    """
    fig = Figure(figsize=(13.5, 4.8), layout="constrained")
    axes = fig.subplots(1, 3)
    k, j, i = (int(round(float(v))) for v in peak_index)
    k, j, i = (min(max(v, 0), n - 1) for v, n in zip((k, j, i), hu.shape, strict=True))
    dk, dj, di = spacing
    psam = _unit(psam)
    views = [
        ("axial", np.s_[k, :, :], (dj, di), False, (i, j)),
        ("coronal", np.s_[:, j, :], (dk, di), True, (i, k)),
        ("sagittal", np.s_[:, :, i], (dk, dj), True, (j, k)),
    ]
    mappable = None
    for ax, (name, index, sp, flip, (x, y)) in zip(axes, views, strict=True):
        _show_ct(ax, hu[index], sp, flip)
        mappable = _show_map(ax, psam[index], sp, flip, floor=OVERLAY_FLOOR)
        ax.plot([x], [y], marker="+", color="white", markersize=14, markeredgewidth=2)
        ax.set_title(f"{name} slice through the maximum")
    fig.colorbar(mappable, ax=axes.tolist(), shrink=0.85, label="3-D PSAM (normalised)")
    fig.suptitle(title)
    return _save(fig, path)


def _unit(values) -> np.ndarray:
    values = np.maximum(np.asarray(values, dtype=np.float32), 0.0)
    top = float(values.max()) if values.size else 0.0
    return values / top if top > 0 else values


def _extent_kwargs(shape, spacing, flip: bool) -> dict:
    """imshow arguments for physical pixel aspect; ``flip`` puts row 0 at the bottom (k up)."""
    return {"aspect": float(spacing[0]) / float(spacing[1]), "origin": "lower" if flip else "upper"}


def _show_image(ax, image, spacing, flip: bool) -> None:
    image = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    cmap = "gray" if image.ndim == 2 else None
    ax.imshow(image, cmap=cmap, vmin=0, vmax=1, **_extent_kwargs(image.shape, spacing, flip))
    ax.set_axis_off()


def _show_ct(ax, hu, spacing, flip: bool = False) -> None:
    lo, hi = LUNG_WINDOW_HU
    ax.imshow(hu, cmap="gray", vmin=lo, vmax=hi, **_extent_kwargs(hu.shape, spacing, flip))
    ax.set_axis_off()


def _show_map(ax, values, spacing, flip: bool, floor: float = 0.0):
    shown = np.ma.masked_less_equal(values, floor) if floor > 0 else values
    kwargs = _extent_kwargs(values.shape, spacing, flip)
    return ax.imshow(shown, cmap=CAM_CMAP, alpha=CAM_ALPHA, vmin=0, vmax=1, **kwargs)


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    FigureCanvasAgg(fig)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return path
