"""Sub-regions and the whole-scan pipeline, preprocess_scan (paper 1.2, 2.1-2.3)."""

import dataclasses
import json

import numpy as np
import pytest
import scipy.ndimage as ndi_ref

from sapsam_jax.config import AXES, QUICK, SUBREGIONS, GeometryConfig
from sapsam_jax.preprocess import (
    ScanProjections,
    _scan,
    ct_to_working,
    lesion_projections,
    preprocess_scan,
    subregion_band_projections,
    subregion_image_shape,
    subregion_slices,
)

LEFT_UPPER = SUBREGIONS.index("left_upper")
FUNGUS_BALL = 1  # channel of the lesion images: cavity, fungus ball, pleural thickening


def test_subregion_slices_follow_the_architecture():
    slices = subregion_slices((216, 256, 256))
    assert tuple(slices) == SUBREGIONS
    # Highest k third is upper; i >= W/2 is the patient's left.
    assert slices["left_upper"] == (slice(144, 216), slice(None), slice(128, 256))
    assert slices["right_lower"] == (slice(0, 72), slice(None), slice(0, 128))
    assert subregion_image_shape((216, 256, 256), "axial") == (256, 128)
    assert subregion_image_shape((216, 256, 256), "coronal") == (72, 128)
    assert subregion_image_shape((216, 256, 256), "sagittal") == (72, 256)


def test_a_left_upper_blob_lands_in_left_upper_only():
    hu = np.full((12, 10, 8), -850.0, np.float32)  # lung everywhere, inside the mask
    mask = np.ones(hu.shape, bool)
    k, j, i = 10, 3, 6  # top third (k >= 8), patient's left (i >= 4)
    hu[k, j, i] = 100.0
    expected_pixel = {"axial": (j, i - 4), "coronal": (k - 8, i - 4), "sagittal": (k - 8, j)}
    for axis, pixel in expected_pixel.items():
        soft = subregion_band_projections(hu, mask, axis)[..., 2]  # soft-tissue channel
        hits = np.argwhere(soft > 0)
        assert hits.tolist() == [[LEFT_UPPER, *pixel]], axis


def _phantom(shape=(48, 60, 64), spacing=(2.5, 1.0, 1.0)):
    """Chest-like CT: body, two lungs, a fungus ball in the patient's left upper lung.

    Positions are fractions of ``shape``; returns (hu int16, spacing, labels, ball centroid).
    """
    rng = np.random.default_rng(3)
    k, j, i = np.meshgrid(*(np.arange(n) / n for n in shape), indexing="ij")
    body = ((j - 0.5) / 0.43) ** 2 + ((i - 0.5) / 0.47) ** 2 < 1
    hu = np.where(body, 40.0, -1000.0)
    for ci in (0.28, 0.72):  # patient's right (low i), left (high i)
        lung = ((k - 0.5) / 0.4) ** 2 + ((j - 0.5) / 0.3) ** 2 + ((i - ci) / 0.17) ** 2 < 1
        hu = np.where(lung, -850.0, hu)
    ball = ((k - 0.75) / 0.05) ** 2 + ((j - 0.5) / 0.07) ** 2 + ((i - 0.75) / 0.06) ** 2 < 1
    hu = np.where(ball, 30.0, hu) + rng.normal(0, 15, size=shape)
    labels = ball.astype(np.uint8) * (FUNGUS_BALL + 1)
    return hu.astype(np.int16), spacing, labels, np.argwhere(ball).mean(axis=0)


def _stub_lung_masks(hu, spacing, *, methods, config, backend):
    """Threshold masks (paper 2.1's -570 HU): air not connected to the volume's border.

    The refined stub fills the lungs' holes, so the fungus ball is in it and not in the
    conservative one, as with the real refined mask.
    """
    air = np.asarray(hu) < config.threshold_hu
    labels, _ = ndi_ref.label(air)
    faces = (labels[0], labels[-1], labels[:, 0], labels[:, -1], labels[..., 0], labels[..., -1])
    border = np.unique(np.concatenate([f.ravel() for f in faces]))
    lungs = air & ~np.isin(labels, border)
    both = {"conservative": lungs, "refined": ndi_ref.binary_fill_holes(lungs)}
    return {m: both[m] for m in methods}


@pytest.fixture
def stub_masks(monkeypatch):
    monkeypatch.setattr(_scan, "_lung_masks", _stub_lung_masks)


@pytest.fixture(scope="module")
def quick_scan():
    hu, spacing, labels, ball_centre = _phantom()
    stages = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_scan, "_lung_masks", _stub_lung_masks)
        scan = preprocess_scan(
            hu,
            spacing,
            config=QUICK,
            backend="cpu",
            lesion_labels=labels,
            progress=lambda stage, done, total: stages.append((stage, done, total)),
            keep_masks=True,
        )
    return scan, ball_centre, stages, (hu, spacing, labels)


def test_preprocess_scan_shapes_and_types(quick_scan):
    scan, _, stages, _ = quick_scan
    assert isinstance(scan, ScanProjections)
    work = QUICK.geometry.working_shape  # (54, 64, 64)
    assert len(scan.rotations) == 27 and scan.rotations[13] == (0.0, 0.0, 0.0)
    for axis, a in AXES.items():
        image = tuple(n for d, n in enumerate(work) if d != a)
        sub = subregion_image_shape(work, axis)
        assert scan.gray[axis].shape == (27, *image) and scan.gray[axis].dtype == np.float32
        assert scan.bands[axis].shape == (27, 6, *sub, 3) and scan.bands[axis].dtype == np.float32
        assert scan.lesions[axis].shape == (6, *sub, 3) and scan.lesions[axis].dtype == np.uint8
        for images in (scan.gray[axis], scan.bands[axis]):
            assert isinstance(images, np.ndarray) and 0 <= images.min() and images.max() <= 1
        assert scan.gray[axis].max() > 0 and scan.bands[axis][:, :, ..., 1].max() > 0
    json.dumps({"mapping": scan.mapping, "qc": scan.qc})
    assert {s for s, _, _ in stages} == {"masks", "resample", "rotations", "lesions"}
    assert [s for s, _, _ in stages][:2] == ["masks", "resample"]
    assert ("rotations", 27, 27) in stages


def test_preprocess_scan_qc(quick_scan):
    scan, _, _, (hu, spacing, _) = quick_scan
    qc = scan.qc
    voxel_ml = np.prod(spacing) / 1000
    assert qc["refined_volume_ml"] == pytest.approx(scan.masks["refined"].sum() * voxel_ml)
    assert qc["conservative_volume_ml"] < qc["refined_volume_ml"]  # the ball is only in refined
    assert qc["lung_volume_ml"] == qc["refined_volume_ml"]
    assert qc["lung_volume_implausible"]  # a ~150 mL phantom is no adult lung
    fractions = qc["subregion_fraction"]
    assert tuple(fractions) == SUBREGIONS and sum(fractions.values()) == pytest.approx(1, abs=0.02)
    # The box is the lungs' box, so each sixth holds a fair share of lung (thirds of ellipsoids).
    assert min(fractions.values()) > 0.08


def test_fungus_ball_lands_in_left_upper_at_its_pixel(quick_scan):
    scan, ball_centre, _, _ = quick_scan
    centre = ct_to_working(ball_centre, scan.mapping)
    sl = subregion_slices(QUICK.geometry.working_shape)["left_upper"]
    local = centre - np.array([sl[0].start, 0, sl[2].start])
    for axis, a in AXES.items():
        lesions = scan.lesions[axis]
        assert lesions[:, ..., FUNGUS_BALL].any(axis=(1, 2)).tolist() == [
            s == "left_upper" for s in SUBREGIONS
        ]
        assert not lesions[..., [0, 2]].any()  # no cavity, no pleural thickening
        y, x = np.round(np.delete(local, a)).astype(int)
        assert lesions[LEFT_UPPER, y, x, FUNGUS_BALL] == 1
        # The unrotated band images see the ball as soft tissue there, and it is brighter there
        # than anywhere in the other sub-regions' soft-tissue channels (edges blur a little).
        soft = scan.bands[axis][13, ..., 2]
        assert soft[LEFT_UPPER, y, x] > 0.3
        assert soft[LEFT_UPPER, y, x] > np.delete(soft, LEFT_UPPER, axis=0).max()


def test_rotations_change_the_images(quick_scan):
    scan, *_ = quick_scan
    gray = scan.gray["coronal"]
    diffs = [np.abs(gray[r] - gray[13]).max() for r in range(27) if r != 13]
    assert min(diffs) > 0.01


TINY = dataclasses.replace(QUICK, name="tiny", geometry=GeometryConfig(grid_shape=(36, 32, 32)))


def test_lesions_absent_without_labels(stub_masks):
    hu, spacing, _, _ = _phantom(shape=(30, 36, 40))
    scan = preprocess_scan(hu, spacing, config=TINY, backend="cpu", method="twin")
    assert scan.lesions is None and scan.masks is None
    assert scan.bands["axial"].shape == (27, 6, 16, 8, 3)
    assert scan.gray["axial"].max() > 0 and np.isfinite(scan.bands["axial"]).all()


@pytest.mark.parametrize("slices, thickness", [(14, 1), (17, 1), (28, 1), (36, 2), (8, 1)])
def test_a_lesion_is_in_exactly_the_working_voxels_it_overlaps(slices, thickness):
    # A pleural-thickening sheet one or two CT slices thick, at 0.7-3 CT slices per working
    # slice. Point sampling saw such sheets at 12 of 17, 12 of 28 and 24 of 35 positions.
    geometry = GeometryConfig(grid_shape=(24, 16, 16))  # 12 working slices
    starts = [sl[0].start for sl in subregion_slices(geometry.working_shape).values()]
    scale = slices / geometry.working_shape[0]
    for k in range(slices - thickness + 1):
        labels = np.zeros((slices, 8, 8), np.uint8)
        labels[k : k + thickness, 2:6, 2:6] = 3
        seen = lesion_projections(labels, (1.0, 1.0, 1.0), None, geometry, axes=("coronal",))
        rows = {  # working k of the sheet, over the sub-regions' (k, i) images
            start + row
            for start, image in zip(starts, seen["coronal"][..., 2], strict=True)
            for row in np.flatnonzero(image.any(axis=1))
        }
        # Working slice w spans CT [w * scale, (w + 1) * scale); the sheet [k, k + thickness).
        overlapping = {w for w in range(12) if w * scale < k + thickness and (w + 1) * scale > k}
        assert rows == overlapping, (k, sorted(rows), sorted(overlapping))


def test_real_lung_mask_runs_end_to_end():
    # Voxels of 4-5 mm make adult-sized lungs (~0.7 L each) that the real mask keeps.
    hu, spacing, _, _ = _phantom(shape=(40, 48, 52), spacing=(5.0, 4.0, 4.0))
    scan = preprocess_scan(hu, spacing, config=TINY, backend="cpu")
    assert scan.qc["refined_volume_ml"] >= scan.qc["conservative_volume_ml"] > 0
    assert scan.bands["axial"][13].max() > 0


@pytest.mark.gpu
def test_gpu_matches_cpu(monkeypatch):
    monkeypatch.setattr(_scan, "_lung_masks", _stub_lung_masks_any_backend)
    hu, spacing, labels, _ = _phantom()
    cpu = preprocess_scan(hu, spacing, config=QUICK, backend="cpu", lesion_labels=labels)
    gpu = preprocess_scan(hu, spacing, config=QUICK, backend="gpu", lesion_labels=labels)
    assert gpu.mapping == cpu.mapping
    for axis in AXES:
        for name in ("gray", "bands", "lesions"):
            got, expected = getattr(gpu, name)[axis], getattr(cpu, name)[axis]
            assert isinstance(got, np.ndarray)
            # Resampling and rotation run on cupyx vs scipy: a few boundary voxels may differ.
            assert (np.abs(got.astype(float) - expected) > 1e-3).mean() < 0.01, (axis, name)


def _stub_lung_masks_any_backend(hu, spacing, *, methods, config, backend):
    from sapsam_jax.backend import to_numpy

    masks = _stub_lung_masks(to_numpy(hu), spacing, methods=methods, config=config, backend=None)
    return {m: backend.asarray(v) for m, v in masks.items()}
