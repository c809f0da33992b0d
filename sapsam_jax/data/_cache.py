"""The on-disk projection cache: atomic writers and the :class:`ProjectionCache` reader.

Layout (docs/ARCHITECTURE.md, "Projection cache")::

    CACHE/cache.json                      {"version": 1, "projections": 2, "preset", "config"}
    CACHE/studies/<study_id>/meta.json    labels, patient_id, qc, mapping, shapes, ct path
    CACHE/studies/<study_id>/gray_<axis>.npy     float16 (27, H, W)
    CACHE/studies/<study_id>/bands_<axis>.npy    float16 (27, 6, H, W, 3)
    CACHE/studies/<study_id>/lesions_<axis>.npy  uint8 (6, H, W, 3), only with lesion truth
    CACHE/failures-<i>-of-<n>.csv         study_id, reason: what shard i of n could not preprocess
    CACHE/failures.csv, CACHE/qc.csv      merged summaries (see ``merge_summaries``)

A study directory is written under ``studies/.tmp-<study_id>-<pid>`` and renamed when complete,
so it exists whole or not at all; every other file is written to a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import os
import re
import shutil
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from sapsam_jax.config import AXES, PreprocessConfig
from sapsam_jax.io._manifest import STUDY_ID_PATTERN, STUDY_ID_RULE
from sapsam_jax.io._volume import atomic_path

logger = logging.getLogger(__name__)

CACHE_VERSION = 1  # the layout readers rely on
# What the projections hold for a given config: raised when the code computes them differently,
# so that a cache is not resumed with a mix of old and new studies (readers do not check it).
# 2 (2026-11-22): the lung masks follow the trachea past a lung it touches; lesion projections
# hold every working voxel a lesion overlaps. Caches without the field are version 1.
PROJECTION_VERSION = 2
CACHE_JSON = "cache.json"
STUDIES_DIR = "studies"
META_JSON = "meta.json"
FAILURES_CSV = "failures.csv"
QC_CSV = "qc.csv"
TMP_PREFIX = ".tmp-"
FAILURE_FIELDS = ("study_id", "reason")
_SHARD_FAILURES_RE = re.compile(r"^failures-(\d+)-of-(\d+)\.csv$")


class CacheError(RuntimeError):
    """The projection cache (or one of its studies) is missing, corrupt or incompatible."""


# --------------------------------------------------------------------------- atomic files


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling, synced, and a rename (never
    half-written; ``io.atomic_path``)."""
    with atomic_path(path, suffix=Path(path).suffix) as tmp:
        Path(tmp).write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    atomic_write_text(path, text)


def atomic_write_csv(path: str | os.PathLike, fields, rows) -> None:
    """Write dict ``rows`` as CSV with header ``fields`` atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(
        buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def _json_default(obj):
    """JSON for the NumPy scalars/arrays, paths and mappings that meta.json carries."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping):  # e.g. the read-only annotation mappings of a manifest Study
        return dict(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def to_jsonable(obj):
    """``obj`` as plain JSON types (tuples become lists), exactly as it reads back from disk."""
    return json.loads(json.dumps(obj, default=_json_default))


def nonfinite_to_null(value):
    """NaN and +-inf (undefined metrics, no distance) as None: they are not JSON, and strict
    readers refuse Python's ``NaN``/``Infinity`` tokens."""
    if isinstance(value, Mapping):
        return {k: nonfinite_to_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [nonfinite_to_null(v) for v in value]
    if isinstance(value, float | np.floating) and not np.isfinite(value):
        return None
    return value


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (created if missing) for read-merge-write sections.

    Shards on one machine (and on NFS with lockd) serialise their summary merges through it, so
    the last shard to finish writes summaries that include every shard's file.
    """
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): merges are still atomic, only not serialised
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- config <-> JSON


def config_to_dict(config: PreprocessConfig) -> dict:
    """The config as it is stored in cache.json (plain JSON types)."""
    return to_jsonable(dataclasses.asdict(config))


def config_from_dict(cls, data: Mapping, where: str = "config"):
    """Rebuild the frozen dataclass ``cls`` (nested dataclasses, tuples) from its JSON dict."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise CacheError(
            f"{where} has fields {unknown} that {cls.__name__} does not know; the cache was built "
            "by a different sapsam_jax version, rebuild it"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = config_from_dict(hint, value, f"{where}.{name}")
        else:
            kwargs[name] = _tuples(value)
    return cls(**kwargs)


def _tuples(value):
    # JSON turns the configs' (nested) tuples into lists; frozen configs compare and hash as tuples.
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def cache_header(config: PreprocessConfig) -> dict:
    return {
        "version": CACHE_VERSION,
        "projections": PROJECTION_VERSION,
        "preset": config.name,
        "config": config_to_dict(config),
    }


def init_cache_dir(out_dir: str | os.PathLike, config: PreprocessConfig) -> Path:
    """Create ``out_dir`` for ``config``, or check that the cache already there was built with it.

    One cache holds one preprocessing config: projections of different grids or HU bands must not
    be mixed, so a cache.json with another config is an error rather than a silent overwrite.
    """
    out = Path(out_dir)
    (out / STUDIES_DIR).mkdir(parents=True, exist_ok=True)
    header = cache_header(config)
    path = out / CACHE_JSON
    if not path.exists():
        atomic_write_json(path, header)  # concurrent shards write identical bytes: harmless race
        return out
    stored = _read_json(path, "cache header")
    if stored.get("version") != CACHE_VERSION:
        raise CacheError(
            f"{path}: cache version {stored.get('version')!r}, this code writes {CACHE_VERSION}; "
            "use a new output folder"
        )
    if stored.get("projections", 1) != PROJECTION_VERSION:
        raise CacheError(
            f"{path}: its projections were computed by code of projection version "
            f"{stored.get('projections', 1)}, this code computes version {PROJECTION_VERSION} "
            "(data._cache.PROJECTION_VERSION); use a new output folder"
        )
    if stored.get("config") != header["config"]:
        diff = _dict_diff(stored.get("config") or {}, header["config"])
        raise CacheError(
            f"{path}: this cache was built with preset {stored.get('preset')!r} and a different "
            f"config ({'; '.join(diff[:5])}); use a new output folder for preset {config.name!r}"
        )
    return out


def _dict_diff(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _dict_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: cache {a!r} != requested {b!r}")
    return out


# --------------------------------------------------------------------------- study writer


def check_study_id(study_id: str) -> str:
    """``study_id`` if it can name a directory, else ValueError (no '/', no leading '.')."""
    if not isinstance(study_id, str) or not STUDY_ID_PATTERN.match(study_id):
        raise ValueError(
            f"study id {study_id!r} cannot name a cache directory (use {STUDY_ID_RULE})"
        )
    return study_id


def study_dir(out_dir: str | os.PathLike, study_id: str) -> Path:
    return Path(out_dir) / STUDIES_DIR / check_study_id(study_id)


def clean_stale_tmp(out_dir: str | os.PathLike, study_id: str) -> int:
    """Remove ``.tmp-<study_id>-<pid>`` dirs a killed run left behind; returns how many.

    Only the shard that owns ``study_id`` calls this, just before writing that study, so it never
    removes a directory another live shard is writing.
    """
    studies = Path(out_dir) / STUDIES_DIR
    pattern = re.compile(rf"^{re.escape(TMP_PREFIX + study_id)}-\d+$")
    stale = [p for p in studies.glob(f"{TMP_PREFIX}{study_id}-*") if pattern.match(p.name)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return len(stale)


def write_study(
    out_dir: str | os.PathLike,
    study_id: str,
    arrays: Mapping[str, np.ndarray],
    meta: dict,
    extra_files: Mapping[str, bytes] | None = None,
) -> Path:
    """Write one study's ``<name>.npy`` arrays, meta.json and extra files, all or nothing.

    Everything goes into ``studies/.tmp-<study_id>-<pid>``, which is renamed to
    ``studies/<study_id>`` last, so readers and reruns never see a half-written study.
    """
    final = study_dir(out_dir, study_id)
    tmp = final.with_name(f"{TMP_PREFIX}{study_id}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        (tmp / META_JSON).write_text(json.dumps(meta, indent=2, default=_json_default) + "\n")
        _fsync_dir_files(tmp)
        try:
            os.rename(tmp, final)  # atomic on POSIX
        except OSError:
            if not final.is_dir():  # not "another writer finished this study first"
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _fsync_dir_files(path: Path) -> None:
    # Data must be on disk before the rename publishes the study, or a crash could leave a
    # complete-looking directory of truncated files.
    for child in path.iterdir():
        with open(child, "rb") as f:
            os.fsync(f.fileno())


# --------------------------------------------------------------------------- failures and qc


def shard_failures_path(out_dir: str | os.PathLike, shard: tuple[int, int]) -> Path:
    index, count = shard
    return Path(out_dir) / f"failures-{index}-of-{count}.csv"


def write_shard_failures(
    out_dir: str | os.PathLike, shard: tuple[int, int], failures: Mapping[str, str]
) -> None:
    rows = [{"study_id": sid, "reason": reason} for sid, reason in sorted(failures.items())]
    atomic_write_csv(shard_failures_path(out_dir, shard), FAILURE_FIELDS, rows)


def read_failures(out_dir: str | os.PathLike) -> dict[str, str]:
    """Merge every shard's failures file: study_id -> reason.

    A study listed by several files (runs with different shard counts) keeps the newest reason;
    a study whose directory exists now has since succeeded and is dropped.
    """
    out = Path(out_dir)
    files = [p for p in out.glob("failures-*-of-*.csv") if _SHARD_FAILURES_RE.match(p.name)]
    merged: dict[str, str] = {}
    for path in sorted(files, key=lambda p: p.stat().st_mtime):
        with open(path, newline="") as f:
            rows = csv.DictReader(f)
            if rows.fieldnames is not None and not {"study_id", "reason"} <= set(rows.fieldnames):
                raise CacheError(
                    f"{path}: damaged failures file (columns {rows.fieldnames}, expected "
                    "study_id and reason); delete it and rerun the preprocessing"
                )
            for row in rows:
                merged[row["study_id"]] = row["reason"]
    studies = out / STUDIES_DIR
    return {sid: r for sid, r in sorted(merged.items()) if not (studies / sid).is_dir()}


def merge_summaries(out_dir: str | os.PathLike, qc_fields, qc_row) -> None:
    """Rewrite ``failures.csv`` and ``qc.csv`` from the shards' files and the studies' meta.json.

    Shards share nothing but the output folder, so each keeps its own ``failures-<i>-of-<n>.csv``;
    the merged files are rebuilt under a lock by every shard when it records a failure and when it
    finishes, so after the last shard they describe the whole cohort. ``qc_row(meta)`` turns one
    meta.json into a qc.csv row.
    """
    out = Path(out_dir)
    with locked(out / ".summary.lock"):
        failures = read_failures(out)
        rows = [{"study_id": sid, "reason": reason} for sid, reason in failures.items()]
        atomic_write_csv(out / FAILURES_CSV, FAILURE_FIELDS, rows)
        atomic_write_csv(out / QC_CSV, qc_fields, _readable_qc_rows(ProjectionCache(out), qc_row))


def _readable_qc_rows(cache, qc_row) -> list[dict]:
    """qc.csv rows of the studies whose meta.json can be read. A folder without one (half
    copied, or being rebuilt by another shard) is the business of the run that owns its study,
    which projects it again; here it must not stop the summary, nor the run."""
    rows = []
    for study_id in cache.study_ids:
        try:
            rows.append(qc_row(cache.meta(study_id)))
        except CacheError as err:
            logger.warning("qc.csv leaves out study %s: %s", study_id, err)
    return rows


# --------------------------------------------------------------------------- reader


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CacheError(f"{what} not found: {path}") from None
    except (OSError, ValueError) as err:
        raise CacheError(f"{what} is unreadable or corrupt: {path} ({err})") from err
    if not isinstance(data, dict):  # other JSON: callers would fail on it naming no file
        shown = json.dumps(data)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise CacheError(f"{what} is corrupt: {path} is not a JSON object but {shown}")
    return data


class ProjectionCache:
    """Read a projection cache built by :func:`sapsam_jax.data.preprocess_cohort`.

    Arrays come back as read-only memmaps (``np.load(mmap_mode="r")``), so opening a cache of
    hundreds of studies costs nothing until pixels are touched.

    >>> cache = ProjectionCache("cache/")                           # doctest: +SKIP
    >>> cache.bands(cache.study_ids[0], "coronal").shape            # doctest: +SKIP
    (27, 6, 128, 64, 3)

    ``studies`` (ids) restricts the cache to those studies, e.g. the current manifest's when the
    folder still holds studies an edited manifest no longer lists.
    """

    def __init__(self, path: str | os.PathLike, studies=None):
        self.path = Path(path)
        # Only these study ids (a manifest's), when the folder also holds other studies.
        self._listed = None if studies is None else frozenset(studies)
        if not self.path.is_dir():
            raise CacheError(f"projection cache not found: {self.path} is not a directory")
        header = _read_json(self.path / CACHE_JSON, "projection cache header")
        if header.get("version") != CACHE_VERSION:
            raise CacheError(
                f"{self.path / CACHE_JSON}: cache version {header.get('version')!r}, this code "
                f"reads version {CACHE_VERSION}; rebuild the cache"
            )
        self.version: int = header["version"]
        self.preset: str = header.get("preset", "")
        self.config: PreprocessConfig = config_from_dict(
            PreprocessConfig, header.get("config", {}), f"{self.path / CACHE_JSON}: config"
        )

    @property
    def studies_path(self) -> Path:
        return self.path / STUDIES_DIR

    @property
    def study_ids(self) -> list[str]:
        """Sorted ids of the complete studies (temporary ``.tmp-*`` dirs are not studies)."""
        if not self.studies_path.is_dir():
            return []
        return sorted(
            p.name
            for p in self.studies_path.iterdir()
            if p.is_dir() and not p.name.startswith(".") and self._wanted(p.name)
        )

    def _wanted(self, study_id: str) -> bool:
        return self._listed is None or study_id in self._listed

    def __contains__(self, study_id) -> bool:
        return (
            isinstance(study_id, str)
            and self._wanted(study_id)
            and (self.studies_path / study_id).is_dir()
        )

    def __len__(self) -> int:
        return len(self.study_ids)

    def __repr__(self) -> str:
        return f"ProjectionCache({str(self.path)!r}, preset={self.preset!r}, studies={len(self)})"

    def _study(self, study_id: str) -> Path:
        path = self.studies_path / str(study_id)
        if not path.is_dir() or str(study_id).startswith("."):
            raise CacheError(f"study {study_id!r} is not in the projection cache: no {path}")
        if not self._wanted(str(study_id)):
            # The folder holds it, but the manifest this cache was opened for does not list it.
            raise CacheError(
                f"study {study_id!r} is in {self.studies_path} but not among the studies this "
                "cache was opened for (the manifest's)"
            )
        return path

    def meta(self, study_id: str) -> dict:
        """The study's meta.json: labels, patient_id, qc, mapping, shapes, ct path."""
        return _read_json(self._study(study_id) / META_JSON, f"meta.json of study {study_id!r}")

    def _array(self, study_id: str, name: str, axis: str, required: bool = True):
        if axis not in AXES:
            raise ValueError(f"unknown axis {axis!r}; expected one of {', '.join(AXES)}")
        path = self._study(study_id) / f"{name}_{axis}.npy"
        if not required and not path.exists():
            return None
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise CacheError(f"study {study_id!r} is incomplete: {path} is missing") from None
        except (OSError, ValueError) as err:
            raise CacheError(f"study {study_id!r}: {path} is unreadable ({err})") from err

    def gray(self, study_id: str, axis: str) -> np.ndarray:
        """float16 (27, H, W) whole-lung grayscale projections, one per rotation."""
        return self._array(study_id, "gray", axis)

    def bands(self, study_id: str, axis: str) -> np.ndarray:
        """float16 (27, 6, H, W, 3) HU-band projections per rotation and sub-region."""
        return self._array(study_id, "bands", axis)

    def lesions(self, study_id: str, axis: str) -> np.ndarray | None:
        """uint8 (6, H, W, 3) per-sign lesion masks, or None for studies without lesion truth."""
        return self._array(study_id, "lesions", axis, required=False)

    @property
    def failures(self) -> dict[str, str]:
        """study_id -> reason for studies that failed and have not succeeded since."""
        return read_failures(self.path)
