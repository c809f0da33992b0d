"""Cohort preprocessing and the projection cache: layout, values, resume, shards, reader."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from sapsam_jax.config import AXES, PAPER, QUICK, SUBREGIONS, PreprocessConfig
from sapsam_jax.data import _cache, _cohort
from sapsam_jax.data._cache import CACHE_VERSION, CacheError, ProjectionCache
from sapsam_jax.data._cohort import preprocess_cohort
from sapsam_jax.io import CTVolume, Study, load_ct, read_manifest, save_nifti, write_manifest
from sapsam_jax.preprocess import preprocess_scan

# Tiny grid: working volume (12, 16, 16), so 27 rotations x 3 axes take well under a second.
TINY = dataclasses.replace(
    PAPER, name="test-tiny", geometry=dataclasses.replace(PAPER.geometry, grid_shape=(24, 32, 32))
)
SHAPE = (40, 48, 48)  # (k, j, i) voxels of the phantoms
SPACING = (5.0, 6.0, 6.0)  # mm: a 200 x 288 x 288 mm chest
N_STUDIES = 4


# --------------------------------------------------------------------------- tiny cohort


def phantom_hu(rng: np.random.Generator, shift_mm: float = 0.0) -> np.ndarray:
    """Air, an elliptic body of soft tissue and two ellipsoid lungs (about 2 L in all)."""
    k, j, i = np.meshgrid(
        *(np.arange(n) * s for n, s in zip(SHAPE, SPACING, strict=True)), indexing="ij"
    )
    ck, cj, ci = (n * s / 2 for n, s in zip(SHAPE, SPACING, strict=True))
    hu = np.full(SHAPE, -1000.0)
    hu[((j - cj) / 120) ** 2 + ((i - ci) / 135) ** 2 <= 1] = 40.0
    for side in (-1, 1):
        ellipsoid = (
            ((k - ck) / 75) ** 2
            + ((j - cj - shift_mm) / 65) ** 2
            + ((i - ci - side * 62) / 48) ** 2
        )
        hu[ellipsoid <= 1] = -850.0
    return (hu + rng.normal(0, 20, SHAPE)).astype(np.int16)


def write_cohort(root: Path, n: int = N_STUDIES, seed: int = 0) -> Path:
    """NIfTI phantoms + manifest; study 0 has a lesion label map (a fungus ball, label 2)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # Canonical grid: k runs along S (LPS z), j along P (y), i along L (x).
    affine = np.eye(4)
    affine[:3, :3] = [[0, 0, SPACING[2]], [0, SPACING[1], 0], [SPACING[0], 0, 0]]
    studies = []
    for s in range(n):
        hu = phantom_hu(rng, shift_mm=4.0 * s)
        ct = CTVolume(hu, SPACING, affine)
        path = save_nifti(root / f"s{s}.nii.gz", hu, ct)
        labels = None
        if s == 0:
            lab = np.zeros(SHAPE, np.int16)
            lab[26:30, 20:26, 30:36] = 2
            labels = save_nifti(root / "s0_labels.nii.gz", lab, ct)
        annotations = {"left_upper": {"fungus_ball": s % 2, "cavity": 0}, "right_lower": {}}
        studies.append(
            Study(
                f"S{s}",
                f"P{s // 2}",
                path,
                cpa=s % 2,
                survival_2y=None if s == 3 else 1,
                annotations=annotations,
                lesion_labels=labels,
            )
        )
    return write_manifest(root / "manifest.csv", studies)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return write_cohort(tmp_path_factory.mktemp("cohort"))


@pytest.fixture(scope="module")
def built(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "cache"
    result = preprocess_cohort(cohort, out, config=TINY, backend="cpu", progress=False)
    return out, result


def count_calls(monkeypatch) -> list[str]:
    """Record the shape of each preprocess_scan call made by the cohort loop."""
    calls = []
    real = _cohort.preprocess_scan

    def counting(hu, *args, **kwargs):
        calls.append(hu.shape)
        return real(hu, *args, **kwargs)

    monkeypatch.setattr(_cohort, "preprocess_scan", counting)
    return calls


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- building


def test_cache_layout_shapes_and_dtypes(built, cohort):
    out, result = built
    assert (result.done, result.skipped, result.failed) == (N_STUDIES, 0, 0)
    cache = ProjectionCache(out)
    assert cache.study_ids == [f"S{s}" for s in range(N_STUDIES)]
    assert cache.config == TINY and cache.preset == "test-tiny"
    header = json.loads((out / "cache.json").read_text())
    assert header["version"] == CACHE_VERSION == 1
    wk, wj, wi = TINY.geometry.working_shape
    image = {"axial": (wj, wi), "coronal": (wk, wi), "sagittal": (wk, wj)}
    sub = {"axial": (wj, wi // 2), "coronal": (wk // 3, wi // 2), "sagittal": (wk // 3, wj)}
    for axis in AXES:
        gray, bands = cache.gray("S1", axis), cache.bands("S1", axis)
        assert isinstance(gray, np.memmap) and gray.dtype == np.float16
        assert gray.shape == (27, *image[axis])
        assert bands.dtype == np.float16 and bands.shape == (27, 6, *sub[axis], 3)
        assert cache.lesions("S1", axis) is None
        lesions = cache.lesions("S0", axis)
        assert lesions.dtype == np.uint8 and lesions.shape == (6, *sub[axis], 3)
        assert lesions[..., 1].any() and not lesions[..., [0, 2]].any()  # fungus ball only
    assert not list((out / "studies").glob(".tmp-*"))


def test_values_match_preprocess_scan(built, cohort):
    out, _ = built
    study = read_manifest(cohort).by_id("S2")
    ct = load_ct(study.path)
    scan = preprocess_scan(ct.hu, ct.spacing, config=TINY, backend="cpu")
    cache = ProjectionCache(out)
    for axis in AXES:
        # float16 keeps 11 significant bits: 5e-4 relative on values in [0, 1].
        np.testing.assert_allclose(cache.gray("S2", axis), scan.gray[axis], atol=1e-3, rtol=1e-3)
        np.testing.assert_allclose(cache.bands("S2", axis), scan.bands[axis], atol=1e-3, rtol=1e-3)
    meta = cache.meta("S2")
    assert meta["mapping"] == json.loads(json.dumps(scan.mapping))
    assert meta["qc"]["lung_volume_ml"] == pytest.approx(scan.qc["lung_volume_ml"])


def test_meta_labels_equal_manifest(built, cohort):
    out, _ = built
    cache = ProjectionCache(out)
    for study in read_manifest(cohort):
        meta = cache.meta(study.study_id)
        assert meta["study_id"] == study.study_id and meta["patient_id"] == study.patient_id
        assert meta["cpa"] == study.cpa and meta["survival_2y"] == study.survival_2y
        assert meta["annotations"] == {r: dict(f) for r, f in study.annotations.items()}
        assert meta["ct_path"] == str(study.path)
        assert meta["lesion_labels_path"] == (
            str(study.lesion_labels) if study.lesion_labels else None
        )
        assert meta["shapes"]["gray_axial"] == list(cache.gray(study.study_id, "axial").shape)
        # Only whitelisted fields: no DICOM header content (names, birth dates) can leak in.
        assert "PatientName" not in json.dumps(meta) and "meta" not in meta


def test_qc_in_meta_and_qc_csv(built):
    out, _ = built
    cache = ProjectionCache(out)
    qc = cache.meta("S0")["qc"]
    k, j, i = np.meshgrid(
        *(np.arange(n) * s for n, s in zip(SHAPE, SPACING, strict=True)), indexing="ij"
    )
    ck, cj, ci = (n * s / 2 for n, s in zip(SHAPE, SPACING, strict=True))
    lungs = sum(  # S0's two ellipsoids (phantom_hu, no shift), counted on the grid
        int(
            np.sum(((k - ck) / 75) ** 2 + ((j - cj) / 65) ** 2 + ((i - ci - d * 62) / 48) ** 2 <= 1)
        )
        for d in (-1, 1)
    )
    truth_ml = lungs * float(np.prod(SPACING)) / 1000.0
    assert qc["lung_volume_ml"] == pytest.approx(truth_ml, rel=0.05)
    assert qc["lung_volume_implausible"] is False
    assert sum(qc["subregion_fraction"].values()) == pytest.approx(1.0)
    rows = read_csv(out / "qc.csv")
    assert [r["study_id"] for r in rows] == cache.study_ids
    assert set(f"fraction_{name}" for name in SUBREGIONS) <= set(rows[0])
    assert read_csv(out / "failures.csv") == [] and cache.failures == {}


# --------------------------------------------------------------------------- resume


def test_resume_recomputes_only_missing_and_reports_broken(tmp_path, monkeypatch, built):
    cohort = write_cohort(tmp_path / "cohort")
    out = tmp_path / "cache"
    shutil.copytree(built[0], out)  # the same phantoms (same seed) already preprocessed
    # Projections not recomputed (meta.json takes the new cohort folder's paths).
    untouched = {
        s: (out / "studies" / s / "gray_axial.npy").stat().st_mtime_ns for s in ("S0", "S3")
    }
    shutil.rmtree(out / "studies" / "S1")
    shutil.rmtree(out / "studies" / "S2")
    source = tmp_path / "cohort" / "s2.nii.gz"
    intact = source.read_bytes()
    source.write_bytes(intact[:300])  # truncated: unreadable scan
    (out / "studies" / ".tmp-S1-999999").mkdir()  # left by a killed run
    (out / "studies" / ".tmp-S1-999999" / "gray_axial.npy").write_bytes(b"partial")

    calls = count_calls(monkeypatch)
    result = preprocess_cohort(cohort, out, config=TINY, backend="cpu", progress=False)

    assert (result.done, result.skipped, result.failed) == (1, 2, 1)
    assert len(calls) == 1  # S1 only: S2 fails before preprocessing, S0/S3 are skipped
    assert ProjectionCache(out).study_ids == ["S0", "S1", "S3"]
    failures = read_csv(out / "failures.csv")
    assert [r["study_id"] for r in failures] == ["S2"]
    assert "s2.nii.gz" in failures[0]["reason"] and "CTLoadError" in failures[0]["reason"]
    assert list(failures[0]) == ["study_id", "reason"]  # no patient fields
    assert ProjectionCache(out).failures == {"S2": failures[0]["reason"]}
    assert not list((out / "studies").glob(".tmp-*"))
    for s, mtime in untouched.items():
        assert (out / "studies" / s / "gray_axial.npy").stat().st_mtime_ns == mtime

    # Repaired scan: the rerun retries only the failed study and clears its failure. (Files
    # rewritten at their paths would be projected again: a cohort regenerated in place.)
    source.write_bytes(intact)
    calls.clear()
    result = preprocess_cohort(cohort, out, config=TINY, backend="cpu", progress=False)
    assert (result.done, result.skipped, result.failed) == (1, 3, 0) and len(calls) == 1
    assert read_csv(out / "failures.csv") == [] and len(read_csv(out / "qc.csv")) == N_STUDIES


def test_failure_inside_preprocessing_does_not_stop_cohort(tmp_path, monkeypatch, cohort):
    def no_lungs(hu, *args, **kwargs):
        raise ValueError("no lungs found: every component touches the border")

    monkeypatch.setattr(_cohort, "preprocess_scan", no_lungs)
    result = preprocess_cohort(cohort, tmp_path / "c", config=TINY, backend="cpu", progress=False)
    assert result.failed == N_STUDIES and result.done == 0
    reasons = {r["study_id"]: r["reason"] for r in read_csv(tmp_path / "c" / "failures.csv")}
    assert reasons["S3"] == "ValueError: no lungs found: every component touches the border"
    assert ProjectionCache(tmp_path / "c").study_ids == []


def test_other_config_is_refused(built, cohort):
    other = dataclasses.replace(TINY, geometry=dataclasses.replace(TINY.geometry, downsample=1))
    with pytest.raises(CacheError, match=r"geometry\.downsample.*new output folder"):
        preprocess_cohort(cohort, built[0], config=other, backend="cpu", progress=False)
    with pytest.raises(CacheError, match="preset 'test-tiny'"):
        preprocess_cohort(cohort, built[0], config=QUICK, backend="cpu", progress=False)


def test_a_cache_projected_by_older_code_is_not_resumed_but_still_read(tmp_path, built, cohort):
    # Same config, other projections (masks, lesion truth changed since): resuming would mix
    # studies of both. A cache.json without the field was written before it existed (version 1).
    old = tmp_path / "old"
    shutil.copytree(built[0], old)
    header = json.loads((old / "cache.json").read_text())
    del header["projections"]
    (old / "cache.json").write_text(json.dumps(header))
    with pytest.raises(CacheError, match="projection version 1, this code computes version 2"):
        preprocess_cohort(cohort, old, config=TINY, backend="cpu", progress=False)
    assert ProjectionCache(old).study_ids == ProjectionCache(built[0]).study_ids  # still read


def test_the_training_cache_folder_changes_with_the_projection_version(monkeypatch):
    from sapsam_jax.train import _data

    before = _data.config_digest(TINY)
    monkeypatch.setattr(_data, "PROJECTION_VERSION", _data.PROJECTION_VERSION + 1)
    assert _data.config_digest(TINY) != before


# --------------------------------------------------------------------------- sharding


def test_shards_together_equal_one_run(tmp_path, built, cohort):
    out = tmp_path / "sharded"
    results = [
        preprocess_cohort(cohort, out, config=TINY, backend="cpu", shard=(i, 2), progress=False)
        for i in range(2)
    ]
    assert [r.done for r in results] == [2, 2]
    one, two = ProjectionCache(built[0]), ProjectionCache(out)
    assert two.study_ids == one.study_ids
    for sid in one.study_ids:
        np.testing.assert_array_equal(two.bands(sid, "coronal"), one.bands(sid, "coronal"))
    assert sorted(p.name for p in out.glob("failures-*.csv")) == [
        "failures-0-of-2.csv",
        "failures-1-of-2.csv",
    ]
    assert [r["study_id"] for r in read_csv(out / "qc.csv")] == one.study_ids


def test_shard_validation():
    assert _cohort.parse_shard("1/4") == (1, 4)
    assert _cohort.shard_studies(list("abcde"), (1, 2)) == ["b", "d"]
    assert _cohort.resolve_shard(None) == (0, 1)  # jax.distributed not initialised
    for bad in ("4/4", "-1/2", "1", "a/b"):
        with pytest.raises(ValueError, match="shard"):
            _cohort.parse_shard(bad)


# --------------------------------------------------------------------------- reader


def test_reader_errors_name_the_path(tmp_path, built):
    with pytest.raises(CacheError, match="not found"):
        ProjectionCache(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match=r"cache\.json"):
        ProjectionCache(tmp_path / "empty")
    out = tmp_path / "copy"
    shutil.copytree(built[0], out)
    cache = ProjectionCache(out)
    with pytest.raises(CacheError, match=r"'S9' is not in .*studies"):
        cache.gray("S9", "axial")
    (out / "studies" / "S1" / "bands_sagittal.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(CacheError, match="bands_sagittal.npy"):
        cache.bands("S1", "sagittal")
    (out / "studies" / "S1" / "gray_axial.npy").unlink()
    with pytest.raises(CacheError, match="incomplete.*gray_axial.npy"):
        cache.gray("S1", "axial")
    (out / "studies" / "S3" / "meta.json").write_text("{not json")
    with pytest.raises(CacheError, match=r"S3.*meta\.json"):
        cache.meta("S3")
    with pytest.raises(ValueError, match="unknown axis"):
        cache.gray("S0", "oblique")
    header = json.loads((out / "cache.json").read_text())
    (out / "cache.json").write_text(json.dumps({**header, "version": 99}))
    with pytest.raises(CacheError, match="version 99"):
        ProjectionCache(out)


@pytest.mark.parametrize("config", [PAPER, QUICK, TINY])
def test_config_round_trip(config):
    stored = json.loads(json.dumps(_cache.config_to_dict(config)))
    assert _cache.config_from_dict(PreprocessConfig, stored) == config


def test_write_study_is_all_or_nothing(tmp_path, monkeypatch):
    (tmp_path / "studies").mkdir()

    def disk_full(path, array, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_cache.np, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        _cache.write_study(tmp_path, "S0", {"gray_axial": np.zeros((2, 2))}, {})
    assert list((tmp_path / "studies").iterdir()) == []


def test_unsafe_study_id_is_rejected():
    for bad in ("../x", "a/b", ".tmp-S0-1", ""):
        with pytest.raises(ValueError, match="cannot name a cache directory"):
            _cache.check_study_id(bad)
    assert _cache.check_study_id("CPA-001_v2.1") == "CPA-001_v2.1"


def test_failures_merge_drops_succeeded_and_keeps_newest(tmp_path):
    (tmp_path / "studies" / "A").mkdir(parents=True)
    _cache.write_shard_failures(tmp_path, (0, 2), {"A": "old", "B": "old reason"})
    os.utime(tmp_path / "failures-0-of-2.csv", (1, 1))
    _cache.write_shard_failures(tmp_path, (0, 1), {"B": "new reason"})
    assert _cache.read_failures(tmp_path) == {"B": "new reason"}


def test_a_damaged_failures_file_is_a_cache_error_naming_it(tmp_path):
    (tmp_path / "failures-0-of-1.csv").write_text("stu\n")  # cut off in its header
    with pytest.raises(_cache.CacheError, match="failures-0-of-1.csv: damaged failures file"):
        _cache.read_failures(tmp_path)


def test_cache_of_a_manifest_is_its_own_and_lists_only_its_studies(tmp_path):
    from sapsam_jax.train import TINY
    from sapsam_jax.train._data import cache_dir_for

    cfg = TINY.replace(data_dir=str(tmp_path / "data"))
    here, there = tmp_path / "siteA" / "cohort.csv", tmp_path / "siteB" / "cohort.csv"
    dirs = [cache_dir_for(cfg.replace(manifest=str(m)), m, QUICK) for m in (here, there, here)]
    assert dirs[0] != dirs[1] and dirs[0] == dirs[2]  # same stem, other folder: another cache
    assert dirs[0].name.startswith("cache-cohort-")

    out = _cache.init_cache_dir(tmp_path / "cache", QUICK)
    for sid in ("S1", "S2", "S3"):
        (out / _cache.STUDIES_DIR / sid).mkdir(parents=True)
    assert ProjectionCache(out).study_ids == ["S1", "S2", "S3"]
    edited = ProjectionCache(out, studies=["S1", "S3", "S9"])  # S2 left the manifest
    assert edited.study_ids == ["S1", "S3"] and "S2" not in edited and "S1" in edited
    with pytest.raises(CacheError, match="not among the studies"):
        edited.meta("S2")  # in the folder, not in the manifest: not read by id either


def test_rerun_takes_corrected_labels_and_keeps_projections_of_moved_files(
    tmp_path, monkeypatch, caplog
):
    root = write_cohort(tmp_path / "cohort", n=2).parent
    out = tmp_path / "cache"
    preprocess_cohort(root / "manifest.csv", out, config=TINY, backend="cpu", progress=False)
    before = np.asarray(ProjectionCache(out).gray("S1", "axial")).copy()
    studies = list(read_manifest(root / "manifest.csv").studies)
    studies[0] = dataclasses.replace(studies[0], cpa=1, survival_2y=0)  # a label corrected
    moved = shutil.copy(studies[1].path, tmp_path / "moved.nii.gz")
    studies[1] = dataclasses.replace(studies[1], path=Path(moved))
    write_manifest(root / "manifest.csv", studies)

    calls = count_calls(monkeypatch)
    result = preprocess_cohort(root / "manifest.csv", out, config=TINY, backend="cpu")
    assert (result.done, result.skipped, len(calls)) == (0, 2, 0)  # nothing re-projected
    cache = ProjectionCache(out)
    assert (cache.meta("S0")["cpa"], cache.meta("S0")["survival_2y"]) == (1, 0)
    assert cache.meta("S1")["ct_path"] == str(studies[1].path)
    np.testing.assert_array_equal(cache.gray("S1", "axial"), before)
    assert "S1: the manifest names other files" in caplog.text

    # A scan rewritten at its path (a cohort regenerated in place) is projected again.
    ct = load_ct(studies[0].path)
    flipped = np.ascontiguousarray(ct.hu[:, :, ::-1])
    os.utime(studies[0].path, ns=(1, 1))  # even a rewrite that keeps the size shows in the time
    save_nifti(studies[0].path, flipped, ct)
    calls = count_calls(monkeypatch)
    result = preprocess_cohort(root / "manifest.csv", out, config=TINY, backend="cpu")
    assert (result.done, result.skipped, len(calls)) == (1, 1, 1)


def test_a_scan_without_lungs_is_a_failure_not_a_blank_study(tmp_path):
    root = tmp_path / "cohort"
    root.mkdir()
    affine = np.diag([SPACING[2], SPACING[1], SPACING[0], 1.0])[[2, 1, 0, 3]]
    hu = np.full(SHAPE, -1000, np.int16)
    hu[5:-5, 5:-5, 5:-5] = 40  # a block of soft tissue in air
    path = save_nifti(root / "block.nii.gz", hu, CTVolume(hu, SPACING, affine))
    manifest = write_manifest(root / "manifest.csv", [Study("B", "PB", path, cpa=0)])
    result = preprocess_cohort(manifest, tmp_path / "cache", config=TINY, backend="cpu")
    assert result.failed == 1 and "no lungs found" in result.failures["B"]
    assert "B" not in ProjectionCache(tmp_path / "cache")
    assert "no lungs found" in (tmp_path / "cache" / "failures.csv").read_text()


def test_a_rerun_killed_early_keeps_the_failures_it_did_not_retry(tmp_path, monkeypatch):
    cohort = write_cohort(tmp_path / "cohort")
    for name in ("s1.nii.gz", "s2.nii.gz"):  # two unreadable scans
        path = tmp_path / "cohort" / name
        path.write_bytes(path.read_bytes()[:300])
    out = tmp_path / "cache"
    preprocess_cohort(cohort, out, config=TINY, backend="cpu", progress=False)
    assert [r["study_id"] for r in read_csv(out / "failures.csv")] == ["S1", "S2"]

    real = _cohort.build_study

    def killed_at_s2(study, *args, **kwargs):
        if study.study_id == "S2":
            raise KeyboardInterrupt  # the rerun dies after retrying S1 (which fails again)
        return real(study, *args, **kwargs)

    monkeypatch.setattr(_cohort, "build_study", killed_at_s2)
    with pytest.raises(KeyboardInterrupt):
        preprocess_cohort(cohort, out, config=TINY, backend="cpu", progress=False)
    assert [r["study_id"] for r in read_csv(out / "failures.csv")] == ["S1", "S2"]


def test_manifest_series_uid_and_allow_gaps_reach_the_loader(tmp_path, monkeypatch):
    cohort = write_cohort(tmp_path / "cohort", n=1)
    study = dataclasses.replace(
        read_manifest(cohort).studies[0], series_uid="1.2.840.99", allow_gaps=True
    )
    write_manifest(cohort, [study])
    seen = []

    def loader(path, **kwargs):
        if Path(path) == Path(study.path):  # not the lesion label map
            seen.append(kwargs)
        return load_ct(path)  # a NIfTI phantom: one series, no gaps

    monkeypatch.setattr(_cohort, "load_ct", loader)
    out = tmp_path / "cache"
    preprocess_cohort(cohort, out, config=TINY, backend="cpu", progress=False)
    assert seen[0] == {"series_uid": "1.2.840.99", "allow_gaps": True}
    meta = ProjectionCache(out).meta("S0")
    assert (meta["series_uid"], meta["allow_gaps"]) == ("1.2.840.99", True)
    _cohort.load_source_ct(meta)  # what explain reloads: the same series, gaps as then
    assert seen[1] == {"series_uid": "1.2.840.99", "allow_gaps": True}

    preprocess_cohort(cohort, out, config=TINY, backend="cpu", progress=False)
    assert len(seen) == 2  # the same row: its projections are kept
    # The row now picks another series of the folder: other voxels, projected again.
    write_manifest(cohort, [dataclasses.replace(study, series_uid="1.2.840.100")])
    result = preprocess_cohort(cohort, out, config=TINY, backend="cpu", progress=False)
    assert (result.done, result.skipped, seen[-1]["series_uid"]) == (1, 0, "1.2.840.100")
    assert ProjectionCache(out).meta("S0")["series_uid"] == "1.2.840.100"


def test_a_damaged_meta_json_is_rebuilt_not_fatal(tmp_path, monkeypatch):
    cohort = write_cohort(tmp_path / "cohort", n=2)
    out = tmp_path / "cache"
    preprocess_cohort(cohort, out, config=TINY, backend="cpu", progress=False)
    (out / _cache.STUDIES_DIR / "S1" / _cache.META_JSON).write_text('{"patient_id": ')  # cut off
    calls = count_calls(monkeypatch)
    result = preprocess_cohort(cohort, out, config=TINY, backend="cpu", progress=False)
    assert (result.done, result.skipped, result.failed, len(calls)) == (1, 1, 0, 1)
    assert ProjectionCache(out).meta("S1")["patient_id"] == "P0"


def test_a_folder_without_meta_json_outside_the_run_does_not_stop_it(tmp_path, caplog):
    # A half-copied study no longer in the manifest (or another shard's study being rebuilt):
    # rebuilding qc.csv read every folder's meta.json and stopped the run at the first failure.
    cohort = write_cohort(tmp_path / "cohort", n=2)
    out = tmp_path / "cache"
    (out / _cache.STUDIES_DIR / "OLD_S9").mkdir(parents=True)
    result = preprocess_cohort(cohort, out, config=TINY, backend="cpu", progress=False)
    assert (result.done, result.failed) == (2, 0)
    assert [row["study_id"] for row in read_csv(out / "qc.csv")] == ["S0", "S1"]
    assert "qc.csv leaves out study OLD_S9" in caplog.text


def test_a_meta_json_of_other_json_outside_the_run_does_not_stop_it(tmp_path, caplog):
    # A meta.json edited into other JSON (a list) is as damaged as a cut-off one, but it passed
    # the reader: rebuilding qc.csv stopped the run with "'list' object has no attribute 'get'",
    # naming no file. The reader now refuses it, naming the file, like a cut-off one.
    cohort = write_cohort(tmp_path / "cohort", n=1)
    out = tmp_path / "cache"
    (out / _cache.STUDIES_DIR / "OLD_S9").mkdir(parents=True)
    (out / _cache.STUDIES_DIR / "OLD_S9" / _cache.META_JSON).write_text("[]\n")
    result = preprocess_cohort(cohort, out, config=TINY, backend="cpu", progress=False)
    assert (result.done, result.failed) == (1, 0)
    assert [row["study_id"] for row in read_csv(out / "qc.csv")] == ["S0"]
    assert "qc.csv leaves out study OLD_S9" in caplog.text
    with pytest.raises(CacheError, match=r"OLD_S9.*meta\.json.*not a JSON object"):
        ProjectionCache(out).meta("OLD_S9")
    (out / "cache.json").write_text('"paper"\n')
    with pytest.raises(CacheError, match=r"cache\.json.*not a JSON object"):
        ProjectionCache(out)


def test_a_label_map_off_the_ct_grid_is_refused(tmp_path):
    import nibabel as nib

    cohort = write_cohort(tmp_path / "cohort", n=1)
    labels = tmp_path / "cohort" / "s0_labels.nii.gz"
    data = np.asarray(load_ct(labels).hu)
    # Same shape, saved the careless way: an identity affine puts it mirrored and scaled.
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data.transpose(2, 1, 0)), np.eye(4)), labels)
    result = preprocess_cohort(cohort, tmp_path / "cache", config=TINY, backend="cpu")
    assert result.failed == 1
    assert "s0_labels.nii.gz lies" in result.failures["S0"]
    assert "off the CT's grid" in result.failures["S0"]


def test_a_lesion_label_map_added_or_removed_in_the_manifest_projects_the_study_again(tmp_path):
    # The lesion projections (explain's localisation truth) come from the label map: a row that
    # gains one must get them, a row that loses one must not keep the old ones.
    cohort = write_cohort(tmp_path / "cohort", n=2)  # S0 has a label map, S1 none
    out = tmp_path / "cache"
    preprocess_cohort(cohort, out, config=TINY, backend="cpu", progress=False)
    assert ProjectionCache(out).lesions("S1", "axial") is None
    studies = list(read_manifest(cohort).studies)
    added = shutil.copy(studies[0].lesion_labels, tmp_path / "cohort" / "s1_labels.nii.gz")
    studies = [
        dataclasses.replace(studies[0], lesion_labels=None),
        dataclasses.replace(studies[1], lesion_labels=Path(added)),
    ]
    write_manifest(cohort, studies)
    result = preprocess_cohort(cohort, out, config=TINY, backend="cpu", progress=False)
    assert (result.done, result.skipped) == (2, 0)
    cache = ProjectionCache(out)
    assert cache.lesions("S0", "axial") is None
    assert cache.lesions("S1", "axial") is not None and cache.lesions("S1", "axial").any()


def test_a_label_map_with_values_outside_the_documented_labels_is_refused(tmp_path):
    # A 0/255 lesion mask passed the check (values up to 255 were allowed), and as only labels
    # 1-3 are projected every lesion was dropped silently: no localisation truth.
    cohort = write_cohort(tmp_path / "cohort", n=1)
    path = tmp_path / "cohort" / "s0_labels.nii.gz"
    ct = load_ct(tmp_path / "cohort" / "s0.nii.gz")
    lesion = np.asarray(load_ct(path).hu) > 0
    save_nifti(path, lesion.astype(np.uint8) * 255, ct)
    result = preprocess_cohort(cohort, tmp_path / "cache", config=TINY, backend="cpu")
    assert result.failed == 1
    reason = result.failures["S0"]
    assert "s0_labels.nii.gz holds values 255" in reason and "expected labels 0-4" in reason


def test_a_cached_label_map_with_values_outside_the_labels_is_not_called_off_the_ct(tmp_path):
    # Localisation reloads the label map of a study cached before labels above 4 were refused;
    # its CacheError said the labels "do not match its CT", which sends one to the affine.
    from sapsam_jax.explain._localisation import cached_lesion_labels

    write_cohort(tmp_path / "cohort", n=1)
    path = tmp_path / "cohort" / "s0_labels.nii.gz"
    ct = load_ct(tmp_path / "cohort" / "s0.nii.gz")
    save_nifti(path, (np.asarray(load_ct(path).hu) > 0).astype(np.uint8) * 255, ct)
    meta = {"study_id": "S0", "lesion_labels_path": str(path)}
    with pytest.raises(CacheError, match="holds values 255") as error:
        cached_lesion_labels(meta, ct)
    assert "do not match its CT" not in str(error.value)
