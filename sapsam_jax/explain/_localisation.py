"""Localisation scores of Grad-CAM maps and 3-D PSAMs where lesion truth is known (synthetic).

The paper judges localisation by eye (paper 3.2, Fig. 3: "locations of maximum activation match
very well"); with the synthetic cohort's lesion masks it can be measured:

- pointing game (Zhang et al. 2018): the map's maximum lies in the lesion's projection
  (``lesions_<axis>.npy``), dilated by ``tolerance_px`` pixels;
- energy inside: the share of the map's sum that falls on the lesion's projection;
- 3-D distance: from the 3-D PSAM maximum (three axes of one sign) to the nearest voxel of that
  sign in the CT-grid label map (manifest ``lesion_labels``), in mm.

The 2-D scores come with their chance level (a map placed at random) and the 3-D energy share
with its own (the sign's share of the PSAM's support), so a reader can tell skill from lesion
size; the 3-D pointing game and distance have none (they depend on the lesion's size and place in
the lung box). A 3-D PSAM that is zero everywhere has no maximum: no distance, a miss, counted as
``n_no_peak``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import scipy.ndimage as ndi

from sapsam_jax.config import AXES, SIGNS, SUBREGIONS
from sapsam_jax.explain._psam import locate_maximum, map_peak, psam_3d, working_volume_to_ct
from sapsam_jax.explain._study import (
    group_runs,
    in_split,
    run_labels,
    run_sets,
    split_studies,
    view_maps,
)

DEFAULT_TOLERANCE_PX = 3  # "a few pixels" of the projection image
# "Detected": the run calls the sign present (the report's decision threshold).
DETECTED_PROBABILITY = 0.5
# 3-D hit radius: a maximum within 1 cm of a lesion points at it (fungus balls are 1-5 cm).
DEFAULT_TOLERANCE_MM = 10.0


def dilate_mask(mask, tolerance_px: int) -> np.ndarray:
    """``mask`` grown by a disc of radius ``tolerance_px`` pixels (the pointing-game tolerance)."""
    mask = np.asarray(mask, dtype=bool)
    if tolerance_px <= 0:
        return mask
    r = int(tolerance_px)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return ndi.binary_dilation(mask, structure=(yy**2 + xx**2) <= r * r)


def pointing_game(cam, mask, tolerance_px: int = DEFAULT_TOLERANCE_PX) -> bool:
    """True when the map's maximum falls on ``mask`` dilated by ``tolerance_px``.

    An all-zero map (ReLU removed everything) points nowhere: False; so does a flat one (e.g.
    InceptionV3's 1x1 ``mixed10`` at its 75x75 minimum input), whose arg-max is the image corner.
    A bilinearly enlarged map whose peak is an edge cell is flat from that cell's centre to the
    border: the maximum is that plateau's centroid (:func:`plateau_peak`), not its top-left pixel.
    """
    peak = map_peak(cam)
    if peak is None:
        return False
    index = tuple(np.floor(peak[1] + 0.5).astype(int))
    return bool(dilate_mask(mask, tolerance_px)[index])


def energy_inside(cam, mask) -> float:
    """Share of the map's (non-negative) sum on ``mask``; 0 for an all-zero map."""
    cam = np.maximum(np.asarray(cam, dtype=np.float64), 0.0)
    total = cam.sum()
    return float(cam[np.asarray(mask, dtype=bool)].sum() / total) if total > 0 else 0.0


def distance_to_lesion_mm(point_kji, lesion_mask, spacing) -> float:
    """Euclidean distance (mm) from a CT point (fractional voxel (k, j, i)) to the nearest lesion
    voxel centre of ``lesion_mask`` (CT grid, ``spacing`` (dk, dj, di) mm); 0 inside a lesion
    voxel, inf without lesion voxels.

    The same value a Euclidean distance transform with ``sampling=spacing`` gives at that voxel,
    computed for the one point instead of the whole volume.
    """
    lesion_mask = np.asarray(lesion_mask, dtype=bool)
    point = np.asarray(point_kji, dtype=np.float64)
    voxel = tuple(np.clip(np.round(point).astype(int), 0, np.array(lesion_mask.shape) - 1))
    if lesion_mask[voxel]:
        return 0.0
    voxels = np.argwhere(lesion_mask)
    if voxels.size == 0:
        return float("inf")
    delta = (voxels - point) * np.asarray(spacing, dtype=np.float64)
    return float(np.sqrt((delta**2).sum(axis=1).min()))


def localisation_scores(
    runs,
    split: str = "test",
    *,
    method: str | None = None,
    tolerance_px: int = DEFAULT_TOLERANCE_PX,
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
    three_d: bool = True,
    batch_size: int | None = 32,
    layer: str | None = None,
) -> dict:
    """Localisation of sign runs on the ``split`` studies that carry lesion truth.

    ``runs`` is a TrainedRun or a sequence of them (e.g. the three axes of each sign). Every
    sub-region whose lesion projection for the sign is non-empty gets a map (unrotated scan,
    target :func:`target_class`). Returns::

        {"split", "method", "tolerance_px", "tolerance_mm",
         "signs": {sign: {axis: {"n", "pointing_game", "pointing_chance",
                                  "energy_inside", "energy_chance"},
                          "3d": {"n", "pointing_game", "energy_inside", "energy_chance",
                                 "distance_mm_mean", "distance_mm_median", "n_no_peak"}}},
         "records": [{"study_id", "sign", "axis" (or "3d"), "subregion", "probability",
                      "hit", "energy_inside", "energy_chance", ...}, ...]}

    2-D: ``pointing_game`` is the hit rate (maximum on the lesion projection dilated by
    ``tolerance_px``) over every map, ``pointing_game_detected`` over the ``n_detected`` maps
    whose sub-region the run calls positive (p >= 0.5), ``pointing_chance`` the mean share of
    the image that dilated mask covers (a random maximum's hit rate), ``energy_inside`` the mean
    share of the map on the lesion projection and ``energy_chance`` the mean lesion share (a flat
    map's). 3-D ("3d", only when
    the sign has runs on all three axes): ``pointing_game`` is the share of PSAM maxima within
    ``tolerance_mm`` of a lesion voxel, ``energy_inside`` the share of the CT-grid PSAM on the
    sign's voxels (chance: their share of the PSAM's support), ``distance_mm_*`` over the PSAMs
    that have a maximum and ``n_no_peak`` the PSAMs that are zero everywhere (a miss each, no
    distance; their records hold ``"maximum": None``). Sign runs only; disease and
    survival runs are skipped. ``method``/``layer`` None: each run's own (``cam_method``,
    ``cam_layer`` of its config); every summary names the method and layer it used.
    """
    runs = [runs] if not isinstance(runs, Sequence) else list(runs)
    groups = group_runs([r for r in runs if r.config.task == "signs"])
    result = {
        "split": split,
        "method": method,
        "layer": layer,
        "tolerance_px": int(tolerance_px),
        "tolerance_mm": float(tolerance_mm),
        "signs": {},
        "records": [],
    }
    grids: dict = {}  # study -> its CT's grid, read once for all signs
    for sign, by_axis in groups.items():
        records = _sign_records(
            sign,
            by_axis,
            split,
            method,
            tolerance_px,
            tolerance_mm,
            three_d,
            batch_size,
            layer,
            grids,
        )
        result["records"] += records
        result["signs"][sign] = _summarise(records)
    return result


def _sign_records(
    sign, by_axis, split, method, tolerance_px, tolerance_mm, three_d, batch_size, layer, grids
) -> list[dict]:
    """One record per (study, axis, sub-region with lesion), plus 3-D records with all axes."""
    records = []
    first = next(iter(by_axis.values()))
    cache, s = first.cache, SIGNS.index(sign)
    studies = sorted({sid for run in by_axis.values() for sid in split_studies(run, split)})
    for study_id in studies:
        # Each axis's run scores only the studies of its own split (runs of other seeds or of
        # the multi-label task split their patients differently).
        here = {a: run for a, run in by_axis.items() if in_split(run, study_id, split)}
        truth = {a: cache.lesions(study_id, a) for a in here}
        if any(t is None for t in truth.values()):
            continue
        views = {
            a: view_maps(run, study_id, sign, method=method, batch_size=batch_size, layer=layer)
            for a, run in here.items()
        }
        for a, view in views.items():
            for r, name in enumerate(SUBREGIONS):
                mask = truth[a][r, ..., s].astype(bool)
                if mask.any():
                    records.append(_record_2d(view, r, name, mask, tolerance_px))
        meta = cache.meta(study_id)
        if three_d and len(views) == len(AXES) and meta.get("lesion_labels_path"):
            grid = _ct_grid(meta, grids)
            records += _records_3d(meta, sign, views, truth, tolerance_mm, grid)
    return records


def _record_2d(view, r: int, name: str, mask, tolerance_px: int) -> dict:
    cam = view.maps[r]
    return {
        "study_id": view.study_id,
        "sign": view.label,
        "axis": view.axis,
        "subregion": name,
        "probability": float(view.probabilities[r]),
        "method": view.method,
        "layer": view.layer,
        "hit": pointing_game(cam, mask, tolerance_px),
        "energy_inside": energy_inside(cam, mask),
        "pointing_chance": float(dilate_mask(mask, tolerance_px).mean()),
        "energy_chance": float(mask.mean()),
    }


def _ct_grid(meta: dict, grids: dict):
    """The study's CT (checked against the cache) as its grid only: shape, spacing and affine,
    with the voxels dropped (a zero-stride array), so that the signs of one call read it once."""
    from sapsam_jax.data._cohort import load_source_ct

    if meta["study_id"] not in grids:
        ct = load_source_ct(meta)
        hu = np.broadcast_to(np.int16(0), ct.hu.shape)
        grids[meta["study_id"]] = dataclasses.replace(ct, hu=hu)
    return grids[meta["study_id"]]


def _records_3d(meta, sign, views, truth, tolerance_mm, ct) -> list[dict]:
    """3-D PSAM maximum -> distance to the sign's nearest voxel in the CT label map, and the
    share of the PSAM (on the CT grid) that lies on the sign's voxels. ``ct``: the study's CT
    grid (:func:`_ct_grid`), which the label map must lie on."""
    lesion = cached_lesion_labels(meta, ct) == SIGNS.index(sign) + 1  # 1 cavity, 2 fungus, ...
    mapping, s = meta["mapping"], SIGNS.index(sign)
    working = tuple(mapping["working_shape"])
    records = []
    for r, name in enumerate(SUBREGIONS):
        if not any(t[r, ..., s].any() for t in truth.values()):
            continue
        volume = psam_3d({a: v.maps[r] for a, v in views.items()}, name, working)
        peak = locate_maximum(volume, mapping, ct.affine)  # the views are unrotated
        distance = float("inf")  # no maximum points nowhere: a miss
        if peak is not None:
            distance = distance_to_lesion_mm(peak["ct_index"], lesion, ct.spacing)
        on_ct = working_volume_to_ct(volume, mapping)
        support = on_ct > 0
        records.append(
            {
                "study_id": meta["study_id"],
                "sign": sign,
                "axis": "3d",
                "subregion": name,
                "probability": float(np.mean([v.probabilities[r] for v in views.values()])),
                "method": next(iter(views.values())).method,
                "layer": "+".join(sorted({v.layer for v in views.values()})),
                "distance_mm": distance,
                "hit": bool(distance <= tolerance_mm),
                "energy_inside": energy_inside(on_ct, lesion),
                "energy_chance": float(lesion[support].mean()) if support.any() else 0.0,
                "maximum": peak,
            }
        )
    return records


def cached_lesion_labels(meta: dict, ct) -> np.ndarray:
    """The lesion label map of a cached study on the grid of its ``ct`` (preprocessing's check,
    ``load_lesion_labels``), a ``CacheError`` naming the study and the file when it is not."""
    from sapsam_jax.data._cache import CacheError
    from sapsam_jax.data._cohort import load_lesion_labels

    try:
        return load_lesion_labels(meta["lesion_labels_path"], ct)
    except ValueError as err:
        raise CacheError(  # off the CT's grid, or values outside the labels 0-4
            f"study {meta['study_id']}: lesion labels {meta['lesion_labels_path']} cannot be "
            f"used: {err}"
        ) from err


def _summarise(records: list[dict]) -> dict:
    """Per axis (and "3d"): counts and mean scores; see :func:`localisation_scores`."""
    out = {}
    for axis in (*AXES, "3d"):
        rows = [r for r in records if r["axis"] == axis]
        if not rows:
            continue
        keys = ("energy_inside", "energy_chance") + (("pointing_chance",) if axis != "3d" else ())
        out[axis] = {"n": len(rows), "pointing_game": _mean(rows, "hit")}
        # The maps a user is shown (scripts/gradcam.py explains sub-regions called positive).
        detected = [r for r in rows if r["probability"] >= DETECTED_PROBABILITY]
        out[axis] |= {"n_detected": len(detected), "pointing_game_detected": _mean(detected, "hit")}
        out[axis] |= {k: "/".join(sorted({str(r[k]) for r in rows})) for k in ("method", "layer")}
        out[axis] |= {k: _mean(rows, k) for k in keys}
        if axis == "3d":
            out[axis] |= _distance_summary(rows)
    return out


def _distance_summary(rows: list[dict]) -> dict:
    """Mean and median of the finite distances; a PSAM without a maximum (zero everywhere) has
    none and would make both infinite, so those are counted apart (misses in the pointing game)."""
    d = np.array([r["distance_mm"] for r in rows], dtype=np.float64)
    d = d[np.isfinite(d)]
    return {
        "distance_mm_mean": float(np.mean(d)) if d.size else float("nan"),
        "distance_mm_median": float(np.median(d)) if d.size else float("nan"),
        "n_no_peak": sum(r["maximum"] is None for r in rows),
    }


def _mean(rows, key) -> float:
    return float(np.mean([float(r[key]) for r in rows])) if rows else float("nan")


def localisation_report(runs, split: str = "test", **kwargs) -> list[dict]:
    """Report-table rows, one per (sign, axis) and per sign "3d" (:func:`localisation_scores`).

    ``runs`` are TrainedRuns or workdirs; sign runs whose cache holds lesion truth are scored,
    grouped by cache and architecture (so the three axes of a sign meet for the 3-D PSAM). Each
    row is ``{"sign", "axis", "n", "pointing_game", "energy_inside", "energy_chance",
    "pointing_chance" (2-D), "distance_mm_median"/"distance_mm_mean"/"n_no_peak" (3-D),
    "workdirs"}``.
    """
    from sapsam_jax.train import load_trained

    loaded = [r if hasattr(r, "model") else load_trained(r) for r in runs]
    loaded = [r for r in loaded if r.config.task == "signs" and _has_lesion_truth(r, split)]
    rows = []
    for group in run_sets(loaded):
        scores = localisation_scores(group, split, **kwargs)
        for sign, by_axis in scores["signs"].items():
            for axis, values in by_axis.items():
                workdirs = [
                    str(r.workdir)
                    for r in group
                    if sign in run_labels(r) and axis in ("3d", r.config.axis)
                ]
                rows.append({"sign": sign, "axis": axis, **values, "workdirs": workdirs})
    return rows


def _has_lesion_truth(run, split: str) -> bool:
    return any(run.cache.lesions(s, run.config.axis) is not None for s in split_studies(run, split))
