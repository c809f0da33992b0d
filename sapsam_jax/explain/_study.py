"""Grad-CAM maps of trained runs for one study, and the figures + 3-D PSAM files of a study.

A trained run (``sapsam_jax.train.load_trained``) is one network: one task, one projection axis,
and for the sign task one sign (or all three, ``sign="multi"``). The 3-D PSAM of a sign needs the
three runs of that sign, one per axis (paper 2.4 trains 9 sign networks).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from sapsam_jax.config import AXES, SIGNS, SUBREGIONS
from sapsam_jax.explain._figures import figure_title, save_fig3, save_psam3d_figure
from sapsam_jax.explain._gradcam import grad_cam
from sapsam_jax.explain._psam import (
    backproject,
    locate_maximum,
    map_peak,
    psam_3d,
    region_slices,
    resize_map,
    rotated_to_ct,
    rotation_index,
    working_volume_to_ct,
)

MAP_NAMES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "hirescam": "HiResCAM"}
# A run's workdir holds these (docs/ARCHITECTURE.md, "Training workdir").
_WORKDIR_FILES = ("config.json", "run.json", "split.json")


@dataclass(frozen=True)
class ViewMaps:
    """Grad-CAM maps of one run for one study and label, one per image (sub-region or scan).

    ``maps`` (N, H, W) float32 are resized back to the cache image size (H, W), so a pixel is a
    ray of the working volume; ``images`` (N, H, W, C) are the cache images they explain;
    ``probabilities`` (N,) the run's output for the label; ``subregions`` names each image
    (None for a whole-scan image); ``method``/``layer`` say how the maps were made; ``angles``
    are the (about-k, about-j, about-i) degrees of ``rotation`` in the run's cache (what the
    mapping back to the CT undoes).
    """

    study_id: str
    label: str
    axis: str
    rotation: int
    subregions: tuple[str | None, ...]
    images: np.ndarray
    maps: np.ndarray
    probabilities: np.ndarray
    method: str = "gradcam"
    layer: str | None = None  # the model layer the maps come from
    angles: tuple[float, float, float] = (0.0, 0.0, 0.0)


def find_workdirs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Training workdirs at or up to two levels under ``paths`` (``runs``, ``runs/signs-axial``)."""
    paths = [Path(p) for p in paths]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} does not exist")
    found = []
    for root in paths:
        root = root.resolve()  # the same run named twice (relative, absolute) is one run
        candidates = [root, *sorted(root.glob("*")), *sorted(root.glob("*/*"))]
        found += [p for p in candidates if all((p / f).is_file() for f in _WORKDIR_FILES)]
    if not found:
        where = ", ".join(map(str, paths))
        raise FileNotFoundError(f"no training workdir ({' + '.join(_WORKDIR_FILES)}) under {where}")
    return list(dict.fromkeys(found))


def run_labels(run) -> tuple[str, ...]:
    """What a run predicts: its sign(s) for the sign task, else the task (disease, survival)."""
    if run.config.task != "signs":
        return (run.config.task,)
    return SIGNS if run.config.sign in ("multi", "all") else (run.config.sign,)


def target_class(run, label: str) -> int:
    """Output index whose logit is y^c of eq. (1): the sign's output of a multi-label run, else
    class 1 (sign present / CPA / death within 2 years) of the two-class softmax."""
    return SIGNS.index(label) if run.multi_label else 1


def split_studies(run, split: str = "test") -> list[str]:
    """Study ids of the cache whose patient is in ``run.split[split]`` (split by patient)."""
    patients = set(run.split.get(split, []))
    return [s for s in run.cache.study_ids if run.cache.meta(s)["patient_id"] in patients]


def in_split(run, study_id: str, split: str) -> bool:
    """Whether ``study_id``'s patient is in ``run``'s ``split`` (runs of other tasks, signs or
    seeds split their patients differently)."""
    return run.cache.meta(study_id)["patient_id"] in set(run.split.get(split, []))


def rotation_of(run, rotation: int | None) -> tuple[int, tuple[float, float, float]]:
    """(index, angles) of a rotation of ``run``'s cache; None is its identity.

    Indices follow the cache's own ``GeometryConfig.rotations()`` (the first array axis), so a
    cache built with other angles maps back with its own.
    """
    geometry = run.cache.config.geometry
    rotations = geometry.rotations()
    if rotation is None:
        index = geometry.identity_rotation_index
    else:
        index = rotation_index(rotation, len(rotations))
    return index, tuple(float(a) for a in rotations[index])


def view_maps(
    run,
    study_id: str,
    label: str,
    *,
    method: str | None = None,
    rotation: int | None = None,
    layer: str | None = None,
    batch_size: int | None = 32,
) -> ViewMaps:
    """Grad-CAM of ``run`` on one study: the six sub-region images (sign task) or the scan.

    Images go through ``train.model_inputs`` (the exact training input), the map comes back at
    model size and is resized to the cache image; the target is :func:`target_class`.
    ``method``/``layer`` default to the run's (:func:`run_cam_settings`); ``rotation`` (an index
    of the cache's 27) to its identity.
    """
    from sapsam_jax.train import model_inputs

    method, layer = run_cam_settings(run, method, layer)
    rotation, angles = rotation_of(run, rotation)
    axis, cache = run.config.axis, run.cache
    if run.config.task == "signs":
        images = np.asarray(cache.bands(study_id, axis)[rotation], dtype=np.float32)
        subregions = tuple(SUBREGIONS)
    else:
        images = np.asarray(cache.gray(study_id, axis)[rotation], dtype=np.float32)[None, ..., None]
        subregions = (None,)
    target = target_class(run, label)
    x = model_inputs(run, images)
    maps, logits = grad_cam(
        run.model,
        x,
        target,
        layer=layer,
        method=method,
        batch_size=batch_size and min(batch_size, len(images)),
        return_logits=True,
    )
    maps = np.stack([resize_map(m, images.shape[1:3]) for m in np.asarray(maps)])
    return ViewMaps(
        study_id=study_id,
        label=label,
        axis=axis,
        rotation=rotation,
        angles=angles,
        method=method,
        layer=layer,
        subregions=subregions,
        images=images,
        maps=maps,
        probabilities=_probabilities(np.asarray(logits), target, run.multi_label),
    )


def run_cam_settings(run, method: str | None = None, layer: str | None = None) -> tuple[str, str]:
    """The map method and layer to use for ``run``: the arguments, else the run's
    ``cam_method``/``cam_layer`` (train config), else Grad-CAM on the last convolution.

    A configured layer the architecture lacks (the quick preset's VGG layer on an InceptionV3
    run) means the last convolution too.
    """
    config = run.config
    method = method or getattr(config, "cam_method", None) or "gradcam"
    if layer is not None and layer not in run.model.layer_names:
        raise ValueError(
            f"{run.workdir}: {run.config.arch} has no layer {layer!r}; "
            f"its layers are {', '.join(run.model.layer_names)}"
        )
    if layer is None:
        layer = getattr(config, "cam_layer", None)
        if layer not in run.model.layer_names:
            layer = None
    return method, layer or run.model.default_cam_layer


def _probabilities(logits: np.ndarray, target: int, multi_label: bool) -> np.ndarray:
    if multi_label:
        return np.asarray(jax.nn.sigmoid(logits[:, target]))
    return np.asarray(jax.nn.softmax(logits, axis=-1)[:, target])


def group_runs(runs: Sequence) -> dict[str, dict[str, object]]:
    """``{label: {axis: run}}``; two runs for the same label and axis are an error (split them
    with :func:`run_sets` first)."""
    groups: dict[str, dict[str, object]] = {}
    for run in runs:
        for label in run_labels(run):
            axes = groups.setdefault(label, {})
            if run.config.axis in axes:
                raise ValueError(
                    f"two runs for {label} on the {run.config.axis} axis: "
                    f"{axes[run.config.axis].workdir} and {run.workdir}"
                )
            axes[run.config.axis] = run
    return groups


def run_sets(runs: Sequence) -> list[list]:
    """Split ``runs`` into sets that :func:`group_runs` accepts: at most one run per label and
    axis, runs of one cache, architecture, width and seed together, a multi-label run apart from
    one-sign runs (so ``--sign all`` beside ``--sign multi``, or two seeds, give two sets)."""

    def key(run):
        c = run.config
        return (str(c.cache), c.arch, c.width, c.seed, run.multi_label)

    sets: list[tuple[tuple, list, set]] = []
    for run in sorted(runs, key=lambda r: (repr(key(r)), str(r.workdir))):
        slots = {(label, run.config.axis) for label in run_labels(run)}
        home = next((s for s in sets if s[0] == key(run) and not slots & s[2]), None)
        if home is None:
            home = (key(run), [], set())
            sets.append(home)
        home[1].append(run)
        home[2].update(slots)
    return [members for _, members, _ in sets]


def set_name(members: Sequence, all_runs: Sequence) -> str:
    """A folder name for one run set: its workdirs' common path below that of all runs."""
    everything = os.path.commonpath([str(r.workdir) for r in all_runs])
    mine = os.path.commonpath([str(r.workdir) for r in members])
    name = os.path.relpath(mine, everything)
    return "runs" if name == "." else name.replace(os.sep, "_")


def choose_subregions(views: dict[str, ViewMaps], which="positive", threshold: float = 0.5):
    """Indices of the images to explain: ``"all"``, ``"positive"`` (any view predicts the label
    with p >= ``threshold``; the highest-scoring one if none does) or a list of names."""
    first = next(iter(views.values()))
    n = len(first.subregions)
    if which == "all" or n == 1:
        return list(range(n))
    if which == "positive":
        probs = np.stack([v.probabilities for v in views.values()])
        chosen = np.flatnonzero((probs >= threshold).any(axis=0)).tolist()
        return chosen or [int(np.argmax(probs.mean(axis=0)))]
    names = [which] if isinstance(which, str) else list(which)
    return [first.subregions.index(name) for name in names]


def explain_study(
    runs: Sequence,
    study_id: str,
    out_dir: str | os.PathLike,
    *,
    method: str | None = None,
    layer: str | None = None,
    subregions="positive",
    threshold: float = 0.5,
    labels: Sequence[str] | None = None,
    rotation: int | None = None,
) -> dict:
    """Fig. 3-style PNGs for every chosen sub-region and view, plus the 3-D PSAM (NIfTI on the CT
    grid, PNG, maximum in mm and sub-region terms) where all three axes have a run.

    Writes ``out_dir/<study>/<label>_<subregion>_<axis>.png``, ``..._psam3d.nii.gz`` and
    ``..._psam3d.png``, and ``summary.json`` (also returned): per label and sub-region the
    probability per axis, the files, the map method and layer per axis and the 3-D maximum
    (:func:`locate_maximum`; None with a ``reason``, and no 3-D files, when the PSAM is zero
    everywhere). The CT must still be the one the cache was built from (``load_source_ct``).
    ``method``/``layer`` None: each run's own (``run_cam_settings``);
    ``rotation`` None: the identity.
    """
    from sapsam_jax.data._cache import atomic_write_json
    from sapsam_jax.data._cohort import load_source_ct
    from sapsam_jax.io import save_nifti

    out = Path(out_dir) / study_id
    groups = {k: v for k, v in group_runs(runs).items() if labels is None or k in labels}
    if not groups:
        raise ValueError(f"no run predicts any of {labels}")
    first = next(iter(next(iter(groups.values())).values()))
    meta = first.cache.meta(study_id)
    ct = load_source_ct(meta)  # the series the cache was built from, checked against it
    summary = {
        "study_id": study_id,
        "method": method,  # None: each run's own, recorded per axis under "maps"
        "layer": layer,
        "rotation": rotation_of(first, rotation)[0],
        "labels": {},
    }
    for label, by_axis in groups.items():
        views = {
            axis: view_maps(run, study_id, label, method=method, layer=layer, rotation=rotation)
            for axis, run in sorted(by_axis.items(), key=lambda item: AXES[item[0]])
        }
        entries = {}
        for index in choose_subregions(views, subregions, threshold):
            entries[_name(views, index)] = _explain_region(
                views, index, meta["mapping"], ct, out, save_nifti
            )
        summary["labels"][label] = entries
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "summary.json", summary)
    return summary


def _name(views, index) -> str:
    return next(iter(views.values())).subregions[index] or "scan"


def _explain_region(views: dict[str, ViewMaps], index: int, mapping, ct, out: Path, save_nifti):
    """Figures (and the 3-D PSAM when all axes are there) of one sub-region of one study."""
    first = next(iter(views.values()))
    subregion, label, rotation = first.subregions[index], first.label, first.angles
    working = tuple(mapping["working_shape"])
    stem = f"{label}_{subregion or 'scan'}"
    entry = {
        "probability": {a: float(v.probabilities[index]) for a, v in views.items()},
        "maps": {a: {"method": v.method, "layer": v.layer} for a, v in views.items()},
    }
    if len(views) == len(AXES):
        entry["psam3d"] = _psam3d_entry(views, index, mapping, ct, out / stem, save_nifti)
    peak = entry.get("psam3d", {}).get("maximum")
    entry["figures"] = {}
    for axis, view in views.items():
        k = _slice_through_maximum(view.maps[index], axis, subregion, mapping, rotation, peak)
        plane = backproject(view.maps[index], axis, subregion, working)
        overlay = working_volume_to_ct(plane, mapping, rotation=rotation, ct_k=k)
        title = figure_title(
            view.study_id, label, subregion, f"{axis}, slice {k}", view.probabilities[index]
        )
        entry["figures"][axis] = str(
            save_fig3(
                out / f"{stem}_{axis}.png",
                image=view.images[index],
                cam=view.maps[index],
                axis=axis,
                ct_slice=ct.hu[k],
                overlay=overlay,
                title=title,
                image_spacing=_image_spacing(mapping, axis),
                ct_spacing=ct.spacing[1:],
                map_name=f"{MAP_NAMES.get(view.method, view.method)}, {view.layer}",
            )
        )
    return entry


def _psam3d_entry(views: dict[str, ViewMaps], index: int, mapping, ct, stem: Path, save_nifti):
    """The 3-D PSAM of one sub-region: its maximum, NIfTI and figure.

    A PSAM that is zero everywhere has no maximum: ``{"maximum": None, "reason"}`` and no files
    (a blank map crossed at the lung-box corner would read as a finding).
    """
    first = next(iter(views.values()))
    subregion, rotation = first.subregions[index], first.angles
    maps = {a: v.maps[index] for a, v in views.items()}
    volume = psam_3d(maps, subregion, tuple(mapping["working_shape"]))
    peak = locate_maximum(volume, mapping, ct.affine, rotation=rotation)
    if peak is None:
        return {"maximum": None, "reason": _why_no_maximum(views, index)}
    ct_volume = working_volume_to_ct(volume, mapping, rotation=rotation)
    nifti = save_nifti(stem.with_name(f"{stem.name}_psam3d.nii.gz"), ct_volume, ct)
    mean_p = float(np.mean([v.probabilities[index] for v in views.values()]))
    png = save_psam3d_figure(
        stem.with_name(f"{stem.name}_psam3d.png"),
        hu=ct.hu,
        psam=ct_volume,
        peak_index=peak["ct_index"],
        spacing=ct.spacing,
        title=figure_title(first.study_id, first.label, subregion, "3-D PSAM", mean_p),
    )
    return {"maximum": peak, "nifti": str(nifti), "png": str(png)}


def _why_no_maximum(views: dict[str, ViewMaps], index: int) -> str:
    """Why the 3-D PSAM of image ``index`` is zero everywhere (summary.json says so)."""
    silent = [a for a, v in views.items() if not np.any(v.maps[index] > 0)]
    if silent:
        return f"all-zero map on the {' and '.join(silent)} axis: the 3-D PSAM is zero everywhere"
    return "the views' maps are nowhere high together: the 3-D PSAM is zero everywhere"


def _slice_through_maximum(map2d, axis, subregion, mapping, rotation, peak) -> int:
    """Axial CT slice index through the map's maximum.

    With a 3-D PSAM maximum (``peak``) it fixes k. Otherwise a coronal or sagittal map's
    brightest point (its peak plateau's centre, :func:`plateau_peak`, as the pointing game takes
    it) gives k directly (its row); an axial map says nothing about depth, so the ray through its
    maximum is cut in the middle of the sub-region's k range. An all-zero or flat map has no
    brightest pixel (its arg-max would be the image corner): the sub-region's middle.
    """
    if peak is not None:
        k_ct = peak["ct_index"][0]
    else:
        working = tuple(mapping["working_shape"])
        region = region_slices(subregion, working)
        bounds = [region[d].indices(working[d]) for d in range(3)]
        point = np.array([(start + stop - 1) / 2.0 for start, stop, _ in bounds])
        found = map_peak(map2d)
        if found is not None:
            row, col = found[1]
            others = [d for d in range(3) if d != AXES[axis]]
            point[others] = [bounds[others[0]][0] + row, bounds[others[1]][0] + col]
        k_ct = rotated_to_ct(point, mapping, rotation)[0]
    return int(np.clip(round(float(k_ct)), 0, mapping["ct_shape"][0] - 1))


def _image_spacing(mapping, axis: str) -> tuple[float, float]:
    """(row, col) mm of a projection image's pixels: the working spacing of its two axes."""
    spacing = mapping.get("working_spacing_mm") or [1.0, 1.0, 1.0]
    return tuple(float(s) for d, s in enumerate(spacing) if d != AXES[axis])
