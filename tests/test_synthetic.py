"""The synthetic phantom cohort: labels where the manifest says, plausible HU, exact files.

Small grids (same field of view, coarser voxels) keep the module well under a minute on 2 cores.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from scipy import ndimage as ndi

from sapsam_jax.config import ANNOTATION_FLAGS, SUBREGIONS
from sapsam_jax.data.synthetic import (
    LABELS,
    Grid,
    cohort_plan,
    default_spacing,
    generate_patient,
    lesion_twins,
    make_cohort,
    scan_twins,
    table1_rates,
)
from sapsam_jax.data.synthetic._anatomy import BONE, FAT, LUNG, MUSCLE, OUTSIDE
from sapsam_jax.io import load_ct, manifest_columns, read_manifest

SHAPE = (56, 96, 96)  # spacing (5.0, 3.6, 3.6) mm: the default field of view, ~0.5 M voxels
SEED = 12
N_PATIENTS = 4
SCANS = (1, 2)
LABEL_FLAG = {v: k for k, v in LABELS.items()}  # label value -> annotation flag


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    path = make_cohort(
        out,
        n_patients=N_PATIENTS,
        shape=SHAPE,
        seed=SEED,
        scans_per_patient=SCANS,
        control_fraction=0.25,
        progress=False,
    )
    return read_manifest(path)


@pytest.fixture(scope="module")
def volumes(cohort):
    """study_id -> (hu, labels) read back from the files."""
    return {s.study_id: (load_ct(s.path).hu, load_ct(s.lesion_labels).hu) for s in cohort}


def _lung_box(hu, spacing):
    """Lung bounding box as preprocessing takes it (refined mask + margin, docs/ARCHITECTURE.md)."""
    from sapsam_jax.preprocess import lung_bbox, lung_mask

    return lung_bbox(lung_mask(hu, spacing, method="refined"), spacing)


def _regions_of(voxels, box) -> set[str]:
    """Sub-regions (k thirds, i halves of the box) that the (k, j, i) voxels fall in."""
    k0, k1, i0, i1 = box[0].start, box[0].stop, box[2].start, box[2].stop
    level = np.clip((voxels[:, 0] - k0) * 3 // (k1 - k0), 0, 2)
    left = (voxels[:, 2] - i0) * 2 >= (i1 - i0)
    return {
        f"{'left' if side else 'right'}_{('lower', 'middle', 'upper')[lev]}"
        for lev, side in set(zip(level.tolist(), left.tolist(), strict=True))
    }


def test_manifest_has_controls_and_fully_annotated_cpa_studies(cohort):
    header = (cohort.path.read_text().splitlines()[0]).split(",")
    assert tuple(header) == manifest_columns
    controls = [s for s in cohort if s.cpa == 0]
    assert len({s.patient_id for s in controls}) == 1  # 25 % of 4 patients
    for study in cohort:
        flags = [study.annotations[r][f] for r in SUBREGIONS for f in ANNOTATION_FLAGS]
        assert study.lesion_labels is not None and study.lesion_labels.is_file()
        if study.cpa:
            assert study.survival_2y in (0, 1)
            assert None not in flags and any(
                study.annotations[r][f] for r in SUBREGIONS for f in LABELS if f != "preexisting"
            ), f"{study.study_id}: a CPA study shows at least one sign"
        else:
            assert study.survival_2y is None and flags == [0] * 24


def test_controls_have_no_lesion_voxels(cohort, volumes):
    for study in cohort:
        if not study.cpa:
            assert not volumes[study.study_id][1].any()


def test_every_sign_lies_in_its_flagged_subregion(cohort, volumes):
    spacing = load_ct(cohort[0].path).spacing
    checked = 0
    for study in (s for s in cohort if s.cpa):
        hu, labels = volumes[study.study_id]
        box = _lung_box(hu, spacing)
        present = set()
        for value, flag in LABEL_FLAG.items():
            components, n = ndi.label(labels == value)
            for c in range(1, n + 1):
                regions = _regions_of(np.argwhere(components == c), box)
                assert len(regions) == 1, f"{study.study_id}: {flag} straddles {regions}"
                region = regions.pop()
                assert study.annotations[region][flag] == 1, f"{study.study_id}: {flag} {region}"
                present.add((region, flag))
                checked += 1
        flagged = {(r, f) for r in SUBREGIONS for f in ANNOTATION_FLAGS if study.annotations[r][f]}
        assert flagged == present, f"{study.study_id}: flags without voxels {flagged - present}"
    assert checked > 0


def test_dicom_round_trips_exactly(cohort):
    study = next(s for s in cohort if s.cpa)
    index = int(study.patient_id[3:])
    n_scans = sum(s.patient_id == study.patient_id for s in cohort)
    scan = generate_patient(index, cpa=True, n_scans=n_scans, shape=SHAPE, seed=SEED)[0]
    assert scan.study_id == study.study_id
    ct = load_ct(study.path)
    assert ct.hu.dtype == np.int16 and np.array_equal(ct.hu, scan.hu)
    assert np.allclose(ct.spacing, scan.grid.spacing, atol=1e-6)
    assert np.array_equal(load_ct(study.lesion_labels).hu, scan.labels)
    files = sorted(study.path.iterdir())
    first, second = (pydicom.dcmread(f) for f in files[:2])
    assert first.Modality == "CT" and first.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert (float(first.RescaleSlope), float(first.RescaleIntercept)) == (1.0, -1024.0)
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert float(second.ImagePositionPatient[2]) > float(first.ImagePositionPatient[2])
    assert first.PatientID == study.patient_id and first.PatientBirthDate == ""  # Type 2, empty


def test_hu_values_are_plausible():
    scan = generate_patient(0, cpa=False, shape=SHAPE, seed=SEED)[0]
    hu, tissue = scan.hu, scan.tissue
    assert -900 <= np.median(hu[tissue == LUNG]) <= -800
    assert 20 <= np.median(hu[tissue == MUSCLE]) <= 70
    assert -130 <= np.median(hu[tissue == FAT]) <= -70
    assert np.percentile(hu[tissue == BONE], 5) > 300
    assert np.all(hu[tissue == OUTSIDE] == -1000) and (tissue == OUTSIDE).any()
    # The lungs are big, within the body, and away from the volume's sides.
    assert 0.05 < scan.lung.mean() < 0.3
    assert not scan.lung[:, [0, -1], :].any() and not scan.lung[:, :, [0, -1]].any()


def test_generation_is_deterministic_per_seed():
    small = (32, 48, 48)
    a = generate_patient(2, cpa=True, n_scans=2, shape=small, seed=3)
    b = generate_patient(2, cpa=True, n_scans=2, shape=small, seed=3)
    c = generate_patient(2, cpa=True, n_scans=2, shape=small, seed=4)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.hu, y.hu) and np.array_equal(x.labels, y.labels)
        assert x.annotations == y.annotations and x.survival_2y == y.survival_2y
    assert not np.array_equal(a[0].hu, c[0].hu)


def test_lesion_twins_add_one_lesion_each_to_the_patients_scan():
    # bench_lesion_contrast relies on it: the same patient as generate_patient draws, and each
    # twin differs from the lesion-free scan only around its own lesion.
    index = 1
    hu0, twins = lesion_twins(index, shape=SHAPE, seed=SEED)
    scan = generate_patient(index, cpa=True, shape=SHAPE, seed=SEED)[0]
    kinds = {lesion.kind for lesion, _ in twins}
    expected = {LABELS[k] for k in kinds if k in LABELS} | (
        {LABELS["preexisting"]} if kinds - set(LABELS) else set()
    )
    expected |= {LABELS["fungus_ball"] for lesion, _ in twins if "ball_onset" in lesion.params}
    assert set(np.unique(scan.labels)) - {0} == expected
    grid = Grid(SHAPE, default_spacing(SHAPE))
    for lesion, hu in twins:
        changed = np.argwhere(hu != hu0)
        assert len(changed) > 0, lesion.kind
        distance = np.linalg.norm(grid.to_mm(changed) - lesion.center, axis=1)
        assert distance.max() < 1.3 * lesion.size + 10.0, (lesion.kind, distance.max())


def test_scan_twins_show_all_the_scan_s_lesions_and_nothing_else():
    index, n_scans = 1, 2
    hu0, hu1, shown = scan_twins(index, n_scans=n_scans, scan=1, shape=SHAPE, seed=SEED)
    assert np.array_equal(hu0, lesion_twins(index, n_scans=n_scans, shape=SHAPE, seed=SEED)[0])
    changed = hu1 != hu0
    for lesion, hu in lesion_twins(index, n_scans=n_scans, shape=SHAPE, seed=SEED)[1]:
        alone = hu != hu0
        assert (alone & changed).sum() >= 0.9 * alone.sum(), lesion.kind  # painted in both
    assert shown and changed.any()
    # The patient cohort_plan says make_cohort draws (the disease cohort: half controls).
    plan = cohort_plan(6, control_fraction=0.5, seed=SEED)
    assert sum(not cpa for _, cpa, _ in plan) == 3 and [i for i, _, _ in plan] == list(range(6))
    assert all(1 <= n <= 3 for _, _, n in plan)


def test_fungus_balls_sit_in_cavities_behind_an_air_crescent(cohort, volumes):
    balls = 0
    for study in (s for s in cohort if s.cpa):
        hu, labels = volumes[study.study_id]
        components, n = ndi.label(labels == LABELS["fungus_ball"])
        enclosed = ndi.binary_fill_holes(labels == LABELS["cavity"])
        for c in range(1, n + 1):
            ball = components == c
            assert enclosed[ball].all(), f"{study.study_id}: fungus ball outside its cavity"
            rim = ndi.binary_dilation(ball) & ~ball & (labels == LABELS["cavity"]) & (hu < -800)
            j_ball = np.argwhere(ball)[:, 1].mean()
            # Air between the ball and the wall, anterior to it (the ball lies dependent).
            assert (np.argwhere(rim)[:, 1] < j_ball).any(), f"{study.study_id}: no air crescent"
            balls += 1
    assert balls > 0, "the test cohort should contain a fungus ball; change SEED"


def _equivalent_radius_mm(n_voxels: int, spacing) -> float:
    return float(np.cbrt(3 * n_voxels * np.prod(spacing) / (4 * np.pi)))


def test_cavities_and_fungus_balls_are_resolvable_on_the_grid(cohort, volumes):
    """Every painted cavity lumen and fungus ball, in every scan, is at least the generator's
    floor (``MIN_LUMEN``, ``MIN_FUNGUS_BALL``) in volume-equivalent radius, measured on the
    written label maps and HU (10 % off for the voxelised outline)."""
    from sapsam_jax.data.synthetic._lesions import MIN_FUNGUS_BALL, MIN_LUMEN

    spacing = load_ct(cohort[0].path).spacing
    vox = max(spacing)
    measured = {"lumen": [], "ball": []}
    for study in (s for s in cohort if s.cpa):
        hu, labels = volumes[study.study_id]
        cavities, n = ndi.label(np.isin(labels, (LABELS["cavity"], LABELS["fungus_ball"])))
        for c in range(1, n + 1):
            cavity = cavities == c
            lumen = cavity & ((hu < -800) | (labels == LABELS["fungus_ball"]))
            measured["lumen"].append(_equivalent_radius_mm(lumen.sum(), spacing))
            ball = cavity & (labels == LABELS["fungus_ball"])
            if ball.any():
                measured["ball"].append(_equivalent_radius_mm(ball.sum(), spacing))
    assert measured["lumen"] and measured["ball"], "need a cavity and a fungus ball; change SEED"
    assert min(measured["lumen"]) >= 0.9 * max(MIN_LUMEN[0] * vox, MIN_LUMEN[1]), measured
    assert min(measured["ball"]) >= 0.9 * max(MIN_FUNGUS_BALL[0] * vox, MIN_FUNGUS_BALL[1])


def test_signs_persist_and_grow_over_longitudinal_scans():
    scans = generate_patient(1, cpa=True, n_scans=3, shape=SHAPE, seed=SEED)
    # Cavities are painted over pleural fibrosis, so count the signs together.
    signs = [np.isin(s.labels, (1, 2, 3)).sum() for s in scans]
    cavity = [np.isin(s.labels, (1, 2)).sum() for s in scans]
    assert signs == sorted(signs) and cavity == sorted(cavity)
    for earlier, later in zip(scans, scans[1:], strict=False):
        for region in SUBREGIONS:
            for flag in ("cavity", "fungus_ball", "pleural_thickening", "preexisting"):
                assert later.annotations[region][flag] >= earlier.annotations[region][flag]
    assert len({s.survival_2y for s in scans}) == 1


def test_table1_rates_favour_the_upper_lungs():
    rates = table1_rates()
    for sign, by_region in rates.items():
        for side in ("left", "right"):
            assert by_region[f"{side}_upper"] > by_region[f"{side}_middle"], sign
            assert by_region[f"{side}_upper"] > by_region[f"{side}_lower"], sign


def test_cli_writes_a_nifti_cohort(tmp_path, monkeypatch, capsys):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "make_synthetic_cohort.py"
    spec = importlib.util.spec_from_file_location("make_synthetic_cohort", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    monkeypatch.chdir(tmp_path)  # a relative --out (the trainer's default runs/data is one)
    argv = [
        "--out",
        "cohort",
        "--patients",
        "2",
        "--shape",
        "40",
        "64",
        "64",
        "--format",
        "nifti",
        "--scans",
        "1",
        "1",
        "--control-fraction",
        "0.5",
        "--quiet",
    ]
    assert cli.main(argv) == 0
    text = (tmp_path / "cohort" / "manifest.csv").read_text()
    assert "cohort/studies" not in text  # paths are relative to the manifest's own folder
    manifest = read_manifest(tmp_path / "cohort" / "manifest.csv")
    assert len(manifest) == 2 and sorted(s.cpa for s in manifest) == [0, 1]
    ct = load_ct(manifest[0].path)
    assert ct.hu.shape == (40, 64, 64) and ct.spacing == pytest.approx((7.0, 5.4, 5.4))

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_make", interrupted)  # Ctrl-C: a line, not a traceback
    assert cli.main([*argv[:2], "--quiet"]) == 130
    assert "interrupted; rerun the same command to resume" in capsys.readouterr().err


def _first_slice(study) -> pydicom.Dataset:
    return pydicom.dcmread(sorted(study.path.glob("*.dcm"))[0])


def test_dicom_uids_name_one_image_only(tmp_path):
    """Cohorts of other sizes draw other controls: a study id can be another image there, and
    then it must carry other UIDs (a PACS merges instances by UID)."""
    small = (24, 32, 32)
    kwargs = dict(shape=small, seed=5, scans_per_patient=(1, 1), progress=False)
    a = read_manifest(make_cohort(tmp_path / "a", n_patients=2, control_fraction=0.5, **kwargs))
    b = read_manifest(make_cohort(tmp_path / "b", n_patients=2, control_fraction=0.0, **kwargs))
    again = read_manifest(make_cohort(tmp_path / "c", n_patients=2, control_fraction=0.5, **kwargs))
    for x, y, z in zip(a, b, again, strict=True):
        same_pixels = np.array_equal(load_ct(x.path).hu, load_ct(y.path).hu)
        same_uid = _first_slice(x).SOPInstanceUID == _first_slice(y).SOPInstanceUID
        assert same_pixels == same_uid, x.study_id
        assert _first_slice(x).SOPInstanceUID == _first_slice(z).SOPInstanceUID  # reproducible
    assert any(x.cpa != y.cpa for x, y in zip(a, b, strict=True))  # the case that matters


def test_rerun_removes_the_old_manifest_first_and_files_are_readable(tmp_path, monkeypatch):
    import os
    import stat

    from sapsam_jax.data.synthetic import _cohort

    old = os.umask(0o022)
    try:
        kwargs = dict(n_patients=2, shape=(24, 32, 32), scans_per_patient=(1, 1), progress=False)
        manifest = make_cohort(tmp_path, seed=1, **kwargs)
        assert stat.S_IMODE(manifest.stat().st_mode) == 0o644  # not mkstemp's owner-only 0600
        study = read_manifest(manifest).studies[0]
        assert stat.S_IMODE(study.path.stat().st_mode) == 0o755
        assert stat.S_IMODE(study.lesion_labels.stat().st_mode) == 0o644

        def interrupted(*args):
            raise KeyboardInterrupt  # e.g. Ctrl-C while the new studies are being written

        with pytest.raises(FileExistsError, match="holds a cohort already"):
            make_cohort(tmp_path, seed=2, **kwargs)  # another cohort over this one: refused
        monkeypatch.setattr(_cohort, "_run", interrupted)
        with pytest.raises(KeyboardInterrupt):
            make_cohort(tmp_path, seed=2, overwrite=True, **kwargs)
        assert not manifest.exists()  # no old labels over new images
        assert not (tmp_path / "studies").exists()  # nor old files taken for the new cohort
    finally:
        os.umask(old)


def test_an_interrupted_cohort_resumes_where_it_stopped(tmp_path, monkeypatch):
    from sapsam_jax.data.synthetic import _cohort

    kwargs = dict(n_patients=3, shape=(24, 32, 32), scans_per_patient=(1, 2), progress=False)
    fresh = read_manifest(make_cohort(tmp_path / "fresh", seed=4, **kwargs))
    real, generated = _cohort.generate_patient, []

    def interrupted_at_the_second(index, **options):
        if len(generated) == 1:
            raise KeyboardInterrupt  # Ctrl-C while the second patient is generated
        generated.append(index)
        return real(index, **options)

    monkeypatch.setattr(_cohort, "generate_patient", interrupted_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        make_cohort(tmp_path / "c", seed=4, **kwargs)
    assert not (tmp_path / "c" / "manifest.csv").exists()
    with pytest.raises(FileExistsError, match="unfinished cohort of other parameters") as err:
        make_cohort(tmp_path / "c", seed=5, **kwargs)
    assert "(seed 4 there, 5 here); rerun with its parameters to finish it;" in str(err.value)

    def counting(index, **options):
        generated.append(index)
        return real(index, **options)

    monkeypatch.setattr(_cohort, "generate_patient", counting)
    resumed = read_manifest(make_cohort(tmp_path / "c", seed=4, **kwargs))
    assert generated == [0, 1, 2]  # the first patient was not generated again
    assert [s.study_id for s in resumed] == [s.study_id for s in fresh]
    for a, b in zip(resumed, fresh, strict=True):
        assert (a.cpa, a.survival_2y, dict(a.annotations)) == (
            b.cpa,
            b.survival_2y,
            dict(b.annotations),
        )
        np.testing.assert_array_equal(load_ct(a.path).hu, load_ct(b.path).hu)
        np.testing.assert_array_equal(load_ct(a.lesion_labels).hu, load_ct(b.lesion_labels).hu)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "labels",
        "manifest.csv",
        "studies",
    ]
    with pytest.raises(FileExistsError, match="holds a cohort already"):
        make_cohort(tmp_path / "c", seed=4, **kwargs)  # finished: not resumed, refused


def test_bad_cohort_arguments_are_named_alone(tmp_path):
    # The message used to list every rule (patients, scans, controls) whichever one was broken.
    with pytest.raises(ValueError) as error:
        make_cohort(tmp_path / "c", n_patients=2, scans_per_patient=(3, 1))
    assert str(error.value) == "scans per patient take 1 <= min <= max (got (3, 1))"
    with pytest.raises(ValueError) as error:
        make_cohort(tmp_path / "c", n_patients=0, control_fraction=2.0)
    assert str(error.value) == (
        "n_patients must be >= 1 (got 0); control_fraction must be in 0..1 (got 2.0)"
    )
    for shape in ((2, 2, 2), (0, 16, 16), (16, 16)):  # crashed mid-generation, plan left behind
        with pytest.raises(ValueError) as error:
            make_cohort(tmp_path / "c", n_patients=1, shape=shape)
        assert str(error.value) == f"shape takes 3 sizes of at least 16 voxels (got {shape})"
    assert not (tmp_path / "c").exists()  # refused before the folder is made


def test_an_interrupted_cohort_resumes_after_its_folder_moved(tmp_path, monkeypatch):
    # Finished patients used to be recorded with absolute paths: a cohort moved (or its parent
    # renamed) between the interruption and the rerun got a manifest naming the old folder.
    from sapsam_jax.data.synthetic import _cohort

    kwargs = dict(n_patients=2, shape=(24, 32, 32), scans_per_patient=(1, 1), progress=False)
    real = _cohort.generate_patient

    def interrupted_at_the_second(index, **options):
        if index == 1:
            raise KeyboardInterrupt
        return real(index, **options)

    monkeypatch.setattr(_cohort, "generate_patient", interrupted_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        make_cohort(tmp_path / "old", seed=4, **kwargs)
    (tmp_path / "old").rename(tmp_path / "new")
    monkeypatch.setattr(_cohort, "generate_patient", real)
    manifest = read_manifest(make_cohort(tmp_path / "new", seed=4, **kwargs))
    for study in manifest:
        assert study.path.is_relative_to(tmp_path / "new") and study.path.exists()
        assert study.lesion_labels.is_relative_to(tmp_path / "new")
