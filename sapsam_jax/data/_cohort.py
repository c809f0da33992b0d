"""Preprocess a cohort into the projection cache: resumable, sharded, one study at a time.

``preprocess_cohort`` reads the manifest, takes this process's shard of it, and for every study
not already cached loads the CT (and its lesion label map), runs
:func:`sapsam_jax.preprocess.preprocess_scan` and writes the study atomically (see ``_cache``).
A study that fails is recorded with its reason and the cohort goes on; a rerun skips finished
studies and retries failed ones. Run as ``python scripts/preprocess.py --manifest M --out CACHE``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from tqdm.auto import tqdm

from sapsam_jax.backend import Backend, get_backend, to_numpy
from sapsam_jax.config import ANNOTATION_FLAGS, AXES, PreprocessConfig, preprocess_preset
from sapsam_jax.data._cache import (
    META_JSON,
    CacheError,
    atomic_write_json,
    clean_stale_tmp,
    init_cache_dir,
    merge_summaries,
    read_failures,
    study_dir,
    to_jsonable,
    write_shard_failures,
    write_study,
)
from sapsam_jax.data._qc import (
    QC_FIELDS,
    mask_overlay_png,
    qc_row,
    summarise_qc,
)
from sapsam_jax.io import load_ct, read_manifest
from sapsam_jax.preprocess import preprocess_scan

logger = logging.getLogger(__name__)
# A failure reason is one CSV cell: long tracebacks and multi-line messages belong in the log.
_MAX_REASON_CHARS = 500
# Lesion label maps: 0 background, then one label per annotation flag (1 cavity ... 4 pre-existing).
_MAX_LABEL = len(ANNOTATION_FLAGS)


@dataclass
class CohortResult:
    """What one ``preprocess_cohort`` call did for its shard."""

    out_dir: Path
    shard: tuple[int, int]
    done: int = 0  # studies preprocessed by this call
    skipped: int = 0  # already in the cache
    failed: int = 0
    failures: dict[str, str] = field(default_factory=dict)  # study_id -> reason
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return self.done + self.skipped + self.failed


def preprocess_cohort(
    manifest,
    out_dir: str | os.PathLike,
    *,
    config: PreprocessConfig | str,
    backend: str | Backend | None = None,
    shard: tuple[int, int] | None = (0, 1),
    qc_png: bool = False,
    progress: bool = True,
) -> CohortResult:
    """Preprocess shard ``shard = (i, n)`` of the cohort in ``manifest`` into the cache ``out_dir``.

    ``manifest`` is a manifest CSV path or a ``Manifest`` from ``read_manifest``; ``config`` a
    ``PreprocessConfig`` or a preset name ("paper", "quick", "tiny"). ``shard=None``
    takes ``(jax.process_index(), jax.process_count())`` when ``jax.distributed`` is initialised
    and ``(0, 1)`` otherwise. Shard ``i`` owns every ``n``-th study of the manifest, so shards
    share nothing but ``out_dir``. ``qc_png`` adds ``qc.png`` (mask outlines over three slices)
    to each new study.
    """
    start = time.perf_counter()
    if isinstance(config, str):
        config = preprocess_preset(config)
    # Everything that can be wrong with the call fails here, before the cache folder is made.
    shard = resolve_shard(shard)
    backend = get_backend(backend)
    studies = shard_studies(manifest_studies(manifest), shard)
    out = init_cache_dir(out_dir, config)
    todo = [s for s in studies if not _reusable(out, s)]
    result = CohortResult(out, shard, skipped=len(studies) - len(todo))
    # Earlier failures of the studies still to do stay on record until this run retries them:
    # a rerun killed early must not drop them from failures.csv.
    pending = {s.study_id for s in todo}
    result.failures = {sid: r for sid, r in read_failures(out).items() if sid in pending}
    bar = tqdm(
        total=len(studies),
        initial=result.skipped,
        unit="study",
        disable=not progress,
        desc=f"preprocess {shard[0]}/{shard[1]}",
        dynamic_ncols=True,
    )
    with bar:
        for study in todo:
            _run_one(study, out, config, backend, qc_png, result)
            bar.update(1)
            bar.set_postfix(done=result.done, failed=result.failed, refresh=False)
    # Always rewritten: a rerun that fixes a study must clear its old failure.
    write_shard_failures(out, shard, result.failures)
    merge_summaries(out, QC_FIELDS, qc_row)
    result.seconds = time.perf_counter() - start
    return result


def _run_one(study, out, config, backend, qc_png, result: CohortResult) -> None:
    try:
        build_study(study, out, config=config, backend=backend, qc_png=qc_png)
        result.done += 1
        result.failures.pop(study.study_id, None)  # an earlier failure, repaired
    except Exception as err:  # any failure of one scan must not stop the cohort
        reason = failure_reason(err)
        logger.warning("study %s failed: %s", study.study_id, reason)
        logger.debug("traceback of study %s", study.study_id, exc_info=True)
        result.failed += 1
        result.failures[study.study_id] = reason
        # Recorded at once so a run killed later still reports it.
        write_shard_failures(out, result.shard, result.failures)
        merge_summaries(out, QC_FIELDS, qc_row)


def build_study(
    study, out_dir, *, config: PreprocessConfig, backend: Backend, qc_png: bool = False
) -> Path:
    """Preprocess one manifest ``Study`` and write it into the cache; returns its directory."""
    target = study_dir(out_dir, study.study_id)  # rejects ids that cannot name a directory
    fingerprint = source_fingerprint(study)  # before reading: a later change shows as a change
    ct = load_ct(study.path, series_uid=study.series_uid, allow_gaps=study.allow_gaps)
    labels = load_lesion_labels(study.lesion_labels, ct) if study.lesion_labels else None
    # Masks come back (to host memory) only when the QC figure needs them.
    scan = preprocess_scan(
        ct.hu, ct.spacing, config=config, backend=backend, lesion_labels=labels, keep_masks=qc_png
    )
    _check_lungs_found(scan.qc)
    arrays = scan_arrays(scan)
    meta = study_meta(study, ct, scan, summarise_qc(scan.qc, config), arrays, config)
    meta["source_fingerprint"] = fingerprint
    extra = None
    if qc_png:
        masks = {name: np.asarray(m, dtype=bool) for name, m in scan.masks.items()}
        extra = {"qc.png": mask_overlay_png(ct.hu, masks, ct.spacing, title=study.study_id)}
    clean_stale_tmp(out_dir, study.study_id)
    write_study(out_dir, study.study_id, arrays, meta, extra)
    return target


def load_source_ct(meta: dict):
    """The CT a cached study was projected from (``meta.json``): the same series of its folder,
    its gaps interpolated as then, checked to still be that scan.

    Maps drawn onto it go through the cache ``mapping``: a file rewritten since (by the rule that
    projects a study again, :func:`_changed`) or a CT of another shape would put them on the
    wrong voxels without a sound, so both are a ``CacheError`` naming the study and the file.
    """
    changed = _changed_source_file(meta)
    if changed is not None:
        raise CacheError(
            f"study {meta['study_id']}: {changed} changed since the cache was built (its "
            "source_fingerprint in meta.json differs); preprocess it again"
        )
    ct = load_ct(
        meta["ct_path"], series_uid=meta.get("series_uid"), allow_gaps=meta.get("allow_gaps", False)
    )
    expected = tuple(meta["mapping"]["ct_shape"])
    if tuple(ct.hu.shape) != expected:
        raise CacheError(
            f"study {meta['study_id']}: the CT {meta['ct_path']} has shape {tuple(ct.hu.shape)}, "
            f"the cache was built from {expected}; preprocess it again"
        )
    return ct


def _changed_source_file(meta: dict) -> str | None:
    """The CT or label file that differs from the ``source_fingerprint`` of meta.json (stat
    calls only), or None. Caches built before the fingerprint have none and pass."""
    recorded = meta.get("source_fingerprint")
    if recorded is None:
        return None
    # The two fields source_fingerprint and _changed read of a manifest Study.
    files = SimpleNamespace(path=meta["ct_path"], lesion_labels=meta.get("lesion_labels_path"))
    now = source_fingerprint(files)
    for key, what in (("ct", "CT"), ("labels", "lesion label map")):
        if _changed({key: recorded.get(key)}, {key: now.get(key)}, meta, files):
            path = files.path if key == "ct" else files.lesion_labels
            return f"the {what} {path}"
    return None


def _check_lungs_found(qc: dict) -> None:
    """An empty lung mask would cache blank projections as a study the networks learn from."""
    for name in ("conservative", "refined"):
        if not qc[f"{name}_volume_ml"] > 0:
            raise ValueError(
                f"no lungs found: the {name} lung mask is empty (nothing below -570 HU inside "
                "the body, paper 2.1); is this a chest CT in Hounsfield units?"
            )


def load_lesion_labels(path, ct) -> np.ndarray:
    """The lesion label map (0 background, 1-4 per sign) on the grid of ``ct`` (a ``CTVolume``),
    as uint8.

    Loaded with ``load_ct`` so it gets the same canonical (k, j, i) orientation as the CT; its
    own geometry must place its voxels where the CT's are (within a quarter voxel), or a map
    saved with a wrong affine would put every lesion mirrored or shifted, silently.
    """
    volume = load_ct(path)
    labels = np.asarray(volume.hu)
    if labels.shape != ct.hu.shape:
        raise ValueError(
            f"lesion label map {Path(path).name} has shape {labels.shape}, the CT has {ct.hu.shape}"
        )
    offset = _grid_offset_mm(volume.affine, ct.affine, labels.shape)
    if offset > 0.25 * min(ct.spacing):
        raise ValueError(
            f"lesion label map {Path(path).name} lies {offset:.1f} mm off the CT's grid (corner "
            f"voxels); its affine\n{np.round(volume.affine, 3)}\ndoes not match the CT's\n"
            f"{np.round(ct.affine, 3)}\n(save it with the CT's geometry, e.g. io.save_nifti)"
        )
    # Only labels 0-4 mean something (README "The cohort manifest"): a 0/255 mask passed the
    # old check (up to 255) and projected no lesion at all, silently.
    if labels.min() < 0 or labels.max() > _MAX_LABEL:
        bad = np.unique(labels[(labels < 0) | (labels > _MAX_LABEL)])
        shown = ", ".join(str(v) for v in bad[:5]) + (", ..." if bad.size > 5 else "")
        raise ValueError(
            f"lesion label map {Path(path).name} holds values {shown}; expected labels "
            f"0-{_MAX_LABEL} (0 background, 1 cavity, 2 fungus ball, 3 pleural thickening, "
            "4 pre-existing condition)"
        )
    return labels.astype(np.uint8)


def _grid_offset_mm(affine, reference, shape) -> float:
    """Largest distance (mm) between where two affines put the corner voxels of ``shape``."""
    corners = np.array(
        [
            [k, j, i, 1]
            for k in (0, shape[0] - 1)
            for j in (0, shape[1] - 1)
            for i in (0, shape[2] - 1)
        ],
        float,
    )
    moved = corners @ np.asarray(affine, float).T - corners @ np.asarray(reference, float).T
    return float(np.linalg.norm(moved[:, :3], axis=1).max())


def scan_arrays(scan) -> dict[str, np.ndarray]:
    """The cache arrays of one ``ScanProjections``: float16 projections, uint8 lesion masks."""
    arrays = {}
    for axis in AXES:
        arrays[f"gray_{axis}"] = to_numpy(scan.gray[axis]).astype(np.float16)
        arrays[f"bands_{axis}"] = to_numpy(scan.bands[axis]).astype(np.float16)
        if scan.lesions is not None and scan.lesions.get(axis) is not None:
            arrays[f"lesions_{axis}"] = to_numpy(scan.lesions[axis]).astype(np.uint8)
    for name, array in arrays.items():
        # float16 overflows past 65504 and NaNs would poison training silently.
        if array.dtype == np.float16 and not np.isfinite(array).all():
            raise ValueError(f"{name} holds non-finite values after conversion to float16")
    return arrays


def study_meta(study, ct, scan, qc: dict, arrays: dict, config: PreprocessConfig) -> dict:
    """meta.json of one study: labels and ids from the manifest, qc, mapping, shapes, paths.

    Only the manifest's study and patient ids identify the scan: DICOM header fields
    (``ct.meta``: names, birth dates, ...) are deliberately not copied.
    """
    return (
        {"study_id": study.study_id}
        | _row_meta(study)
        | to_jsonable(
            {
                "qc": qc,
                "mapping": scan.mapping,
                "ct_shape": list(np.shape(ct.hu)),
                "spacing": [float(s) for s in ct.spacing],
                "shapes": {name: list(a.shape) for name, a in arrays.items()},
                "dtypes": {name: a.dtype.name for name, a in arrays.items()},
                "preset": config.name,
            }
        )
    )


def failure_reason(err: BaseException) -> str:
    """``ExceptionType: message`` on one line, short enough for a CSV cell."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 3] + "..."


def manifest_studies(manifest) -> list:
    if isinstance(manifest, (str, os.PathLike)):
        manifest = read_manifest(manifest)
    studies = list(getattr(manifest, "studies", manifest))
    dupes = [sid for sid, n in Counter(s.study_id for s in studies).items() if n > 1]
    if dupes:
        raise ValueError(f"manifest lists study ids more than once: {', '.join(map(str, dupes))}")
    return studies


def _is_cached(out: Path, study_id) -> bool:
    try:
        return study_dir(out, study_id).is_dir()
    except ValueError:  # unusable id: build_study reports it as this study's failure
        return False


def source_fingerprint(study) -> dict:
    """Count, total size and newest modification time of the study's CT and label files.

    Stat calls only (nothing is read): a scan rewritten at the same path (a cohort regenerated
    in place, a corrected export) changes it; moving or renaming the folder does not.
    """
    return {
        "ct": _stat_fingerprint(study.path),
        "labels": _stat_fingerprint(study.lesion_labels) if study.lesion_labels else None,
    }


def _stat_fingerprint(path) -> list[int] | None:
    path = Path(path)
    try:
        files = [f for f in path.iterdir() if f.is_file()] if path.is_dir() else [path]
        stats = [f.stat() for f in files]
    except OSError:  # missing: loading will say so
        return None
    return [
        len(stats),
        sum(s.st_size for s in stats),
        max((s.st_mtime_ns for s in stats), default=0),
    ]


def _changed(recorded: dict, now: dict, meta: dict, study) -> bool:
    """Rewritten since projected: at the same path, any change of count, size or time; at a new
    path (moved or copied, which sets new times) a change of file count or size."""
    same_path = meta.get("ct_path") == str(study.path)
    for key in ("ct", "labels"):
        old, new = recorded.get(key), now.get(key)
        if old is None or new is None:
            continue  # no labels, or a file missing (loading reports that)
        if (old != new) if same_path else (old[:2] != new[:2]):
            return True
    return False


def _reusable(out: Path, study) -> bool:
    """Whether the cached projections of ``study`` still belong to its manifest row.

    Labels are copied into meta.json when a study is built; a corrected label in the manifest is
    written into it here (no re-projection). Files that moved keep their projections (a moved
    cohort is not recomputed), with a warning. Files rewritten since the study was built (their
    ``source_fingerprint`` changed, :func:`_changed`: a cohort regenerated in place), rows that
    now pick another ``series_uid`` or ``allow_gaps`` or add or remove a lesion label map, and
    study folders whose meta.json is missing or damaged are projected again.
    """
    if not _is_cached(out, study.study_id):
        return False
    folder = study_dir(out, study.study_id)
    meta = _read_meta(folder)
    now = source_fingerprint(study)
    stale = _stale_reason(meta, now, study)
    if stale:
        logger.warning("study %s: %s; projecting it again", study.study_id, stale)
        shutil.rmtree(folder)  # write_study keeps a folder that exists (another writer's)
        return False
    recorded = meta.get("source_fingerprint")
    row = _row_meta(study)
    if recorded is not None:
        row["source_fingerprint"] = now  # the moved files, from now on
    if any(meta.get(k) != row[k] for k in ("ct_path", "lesion_labels_path")):
        logger.warning(
            "study %s: the manifest names other files than its cached projections were made "
            "from (moved?); keeping them -- delete %s to rebuild",
            study.study_id,
            folder,
        )
    if any(meta.get(k) != v for k, v in row.items()):
        atomic_write_json(folder / META_JSON, meta | row)
    return True


def _read_meta(folder: Path) -> dict | None:
    """meta.json of a cached study; None when a half-copied or damaged folder has none to read."""
    try:
        meta = json.loads((folder / META_JSON).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _stale_reason(meta: dict | None, now: dict, study) -> str | None:
    """Why the cached projections no longer belong to the manifest row, or None."""
    if meta is None:
        return f"its {META_JSON} is missing or unreadable"
    recorded = meta.get("source_fingerprint")  # absent in caches built before 2026-11-22
    if recorded is not None and _changed(recorded, now, meta, study):
        return "its CT or label files changed since they were projected"
    # Another series of the DICOM folder, or its gaps now (not) interpolated: other voxels.
    # (Caches built before 2026-11-22 did not record these; they are taken as they are.)
    picked = {"series_uid": study.series_uid, "allow_gaps": study.allow_gaps}
    changed = [key for key, value in picked.items() if key in meta and meta[key] != value]
    if changed:
        return f"the manifest row now sets {' and '.join(changed)} otherwise than when projected"
    # A label map added or removed: the lesion projections (localisation truth) are missing or
    # stale. (A label map at a new path is a moved file, kept as the CT is.)
    if "lesion_labels_path" in meta and (meta["lesion_labels_path"] is None) != (
        study.lesion_labels is None
    ):
        return "the manifest row now adds or removes its lesion label map"
    return None


def _row_meta(study) -> dict:
    """What meta.json takes from the manifest row (ids, labels, source files and which series of
    them; explain reloads the CT with these)."""
    return to_jsonable(
        {
            "patient_id": study.patient_id,
            "cpa": study.cpa,
            "survival_2y": study.survival_2y,
            "annotations": {region: dict(flags) for region, flags in study.annotations.items()},
            "ct_path": str(study.path),
            "lesion_labels_path": str(study.lesion_labels) if study.lesion_labels else None,
            "series_uid": study.series_uid,
            "allow_gaps": study.allow_gaps,
        }
    )


def shard_studies(studies: Sequence, shard: tuple[int, int]) -> list:
    """Shard ``i`` of ``n``: every ``n``-th study from the ``i``-th, in manifest order."""
    index, count = shard
    return list(studies)[index::count]


def resolve_shard(shard: tuple[int, int] | None) -> tuple[int, int]:
    """Validate ``(index, count)``; ``None`` follows ``jax.distributed`` when it is initialised."""
    if shard is None:
        shard = _jax_process_shard()
    index, count = (int(v) for v in shard)
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}")
    return index, count


def _jax_process_shard() -> tuple[int, int]:
    # Importing JAX here would start its runtime (and claim GPU memory CuPy needs): only ask an
    # already imported JAX whether jax.distributed.initialize() was called.
    jax = sys.modules.get("jax")
    if jax is None:
        return 0, 1
    is_initialized = getattr(jax.distributed, "is_initialized", None)
    if is_initialized is None or not is_initialized():
        return 0, 1
    return jax.process_index(), jax.process_count()


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)``, for the ``--shard`` flag."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard expects i/n such as 0/4, got {text!r}") from None
    return resolve_shard((index, count))
