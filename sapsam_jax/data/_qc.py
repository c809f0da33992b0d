"""Per-study quality control of the lung masks: volume, sub-region shares, an overlay figure.

A failed segmentation does not raise -- it quietly produces projections of the wrong tissue -- so
every cached study records the numbers that expose one (lung volume, how the lungs split over the
six sub-regions of paper 2.3, measured by ``preprocess_scan``) and a flag when the volume is
implausible for adult lungs (``config.geometry.plausible_lung_ml``); ``qc.csv`` lists them all.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np

from sapsam_jax.config import AXES, SUBREGIONS

QC_FIELDS = (
    "study_id",
    "lung_volume_ml",
    "conservative_volume_ml",
    "lung_volume_implausible",
    *(f"fraction_{name}" for name in SUBREGIONS),
)


def summarise_qc(scan_qc: Mapping, config) -> dict:
    """The study's QC record for meta.json: ``ScanProjections.qc`` plus the bounds it was held to.

    ``preprocess_scan`` measures ``lung_volume_ml`` and the refined-lung fraction per sub-region
    (``subregion_fraction``) and sets ``lung_volume_implausible`` against
    ``config.geometry.plausible_lung_ml``; the flag is computed here only if it is missing. A
    missing or non-finite volume counts as implausible: QC that cannot be computed is no pass.
    """
    record = dict(scan_qc)
    low, high = (float(b) for b in config.geometry.plausible_lung_ml)
    if "lung_volume_implausible" not in record:
        volume = record.get("lung_volume_ml")
        record["lung_volume_implausible"] = bool(
            volume is None or not np.isfinite(volume) or not low <= volume <= high
        )
    record["lung_volume_implausible"] = bool(record["lung_volume_implausible"])
    record["plausible_lung_ml"] = [low, high]
    return record


def qc_row(meta: Mapping) -> dict:
    """One qc.csv row (``QC_FIELDS``) from a study's meta.json."""
    qc = meta.get("qc") or {}
    fractions = qc.get("subregion_fraction") or {}
    row = {
        "study_id": meta.get("study_id"),
        "lung_volume_ml": _round(qc.get("lung_volume_ml"), 1),
        "conservative_volume_ml": _round(qc.get("conservative_volume_ml"), 1),
        "lung_volume_implausible": int(bool(qc.get("lung_volume_implausible"))),
    }
    row.update({f"fraction_{name}": _round(fractions.get(name), 4) for name in SUBREGIONS})
    return row


def _round(value, digits):
    return None if value is None else round(float(value), digits)


_OUTLINES = (("tab:green", "solid"), ("tab:red", "dashed"), ("tab:blue", "dotted"))


def mask_overlay_png(
    hu: np.ndarray, masks: Mapping[str, np.ndarray], spacing, title: str = ""
) -> bytes:
    """PNG of axial, coronal and sagittal CT slices with the outline of each mask.

    Axial and coronal slices go through the lungs' centroid (both lungs show); the sagittal one
    through the centroid of the patient's right lung (``i < centre``), since the mid-sagittal
    plane is mediastinum. Images keep array order except that ``k`` is flipped so the head is up
    (ARCHITECTURE "Orientation"); pixel aspect follows the spacing.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cuts = _cuts(next(iter(masks.values())))
    fig = Figure(figsize=(12, 4.4), dpi=80)
    FigureCanvasAgg(fig)  # Agg canvas, no pyplot: safe in worker processes without a display
    dk, dj, di = (float(s) for s in spacing)
    for col, (axis_name, axis) in enumerate(AXES.items()):
        ax = fig.add_subplot(1, 3, col + 1)
        flip = axis != 0  # coronal/sagittal images have k on the rows: head up
        aspect = {0: dj / di, 1: dk / di, 2: dk / dj}[axis]
        image = _flip(np.take(hu, cuts[axis], axis=axis), flip)
        ax.imshow(image, cmap="gray", vmin=-1200, vmax=400, aspect=aspect)
        for mask, (colour, style) in zip(masks.values(), _OUTLINES, strict=False):
            plane = _flip(np.take(mask, cuts[axis], axis=axis), flip).astype(np.float32)
            if plane.any():
                ax.contour(plane, levels=[0.5], colors=colour, linestyles=style, linewidths=1.0)
        ax.set_title(f"{axis_name} ({'kji'[axis]} = {cuts[axis]})")
        ax.set_axis_off()
    legend = ", ".join(
        f"{name}: {colour.removeprefix('tab:')} {style}"
        for name, (colour, style) in zip(masks, _OUTLINES, strict=False)
    )
    fig.suptitle(f"{title}  [{legend}]")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _cuts(mask: np.ndarray) -> tuple[int, int, int]:
    """Slice index per axis: the mask's centroid, but the right lung's centroid along ``i``."""
    idx = np.argwhere(mask)
    if len(idx) == 0:
        return tuple(n // 2 for n in mask.shape)
    k, j, i = (int(round(c)) for c in idx.mean(axis=0))
    right = idx[idx[:, 2] < i]
    if len(right):
        i = int(round(right[:, 2].mean()))
    return k, j, i


def _flip(image: np.ndarray, flip: bool) -> np.ndarray:
    return image[::-1] if flip else image
