"""Lung masks (paper 2.1) and the marker-flooding watershed behind the refined mask.

Watershed: the NumPy twin of the CUDA kernel against ``skimage.segmentation.watershed`` (exact on
simple cases, >= 99.5 % of voxels on random and real edge maps), the kernel compiled with nvcc,
and GPU parity where a device exists. Masks: a synthetic chest phantom with a juxtapleural ball,
and the real scans in shared/data/real_ct (reference Dice, tumour boxes, leaks).
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import scipy.ndimage as ndi
from skimage.segmentation import watershed as watershed_ref

from sapsam_jax.io import load_ct
from sapsam_jax.preprocess._kernels import (
    WATERSHED_FILE,
    kernel_source,
    watershed_flood_defines,
)
from sapsam_jax.preprocess._mask import lung_air, lung_mask, lung_masks
from sapsam_jax.preprocess._watershed import flood_numpy, quantize_edges, watershed

HU_BONE = 400.0  # cortical bone and calcium; the masks may hold none of it
SOFT_TISSUE_HU = -300.0  # tumour-box voxels above this are the tumour's soft tissue


def dice(a, b) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


# --- watershed: NumPy twin vs scikit-image ---------------------------------------------------


def _random_case(shape, rng, n_markers=5):
    image = ndi.gaussian_filter(rng.random(shape), 2.0)
    edge = np.sqrt(sum(ndi.sobel(image, axis=a) ** 2 for a in range(len(shape))))
    markers = np.zeros(shape, np.int32)
    for label in range(1, n_markers + 1):
        markers[tuple(rng.integers(0, n) for n in shape)] = label
    mask = rng.random(shape) > 0.05
    return edge, markers, mask


def test_flood_splits_a_plateau_like_skimage():
    # Two markers on a flat image: the first-come-first-served split at the midline.
    levels = np.zeros((5, 12), np.uint8)
    markers = np.zeros((5, 12), np.int32)
    markers[2, 0], markers[2, 11] = 1, 2
    ours = flood_numpy(levels, markers)
    np.testing.assert_array_equal(ours, watershed_ref(levels, markers))
    assert (ours[:, :6] == 1).all() and (ours[:, 6:] == 2).all()


def test_flood_follows_the_ridge():
    # Two basins split by a ridge at column 7, markers off-centre: the ridge decides, not distance.
    levels = np.full((6, 15), 10, np.uint8)
    levels[:, 7] = 200
    markers = np.zeros((6, 15), np.int32)
    markers[3, 1], markers[3, 13] = 1, 2
    ours = flood_numpy(levels, markers)
    np.testing.assert_array_equal(ours, watershed_ref(levels, markers))
    assert (ours[:, :7] == 1).all() and (ours[:, 8:] == 2).all()


def test_flood_respects_mask_and_marker_levels():
    rng = np.random.default_rng(1)
    levels = rng.integers(0, 256, (20, 20)).astype(np.uint8)
    markers = np.zeros((20, 20), np.int32)
    markers[0, 0], markers[19, 19], markers[5, 15] = 1, 2, 3
    mask = np.ones((20, 20), bool)
    mask[10, :] = False  # a wall: the bottom half sees only marker 2
    ours = flood_numpy(levels, markers, mask)
    np.testing.assert_array_equal(ours, watershed_ref(levels, markers, mask=mask))
    assert (ours[~mask] == 0).all() and set(np.unique(ours[11:])) == {2}


@pytest.mark.parametrize("shape", [(64, 64), (24, 40, 48)])
@pytest.mark.parametrize("connectivity", [1, 2])
def test_flood_matches_skimage_on_random_maps(shape, connectivity):
    edge, markers, mask = _random_case(shape, np.random.default_rng(0))
    levels = quantize_edges(edge, mask, 256)
    ours = flood_numpy(levels, markers, mask, connectivity)
    same_levels = watershed_ref(levels, markers, connectivity=connectivity, mask=mask)
    float_edges = watershed_ref(edge, markers, connectivity=connectivity, mask=mask)
    assert (ours == same_levels).mean() >= 0.999  # only tie-breaks may differ
    assert (ours == float_edges).mean() >= 0.995  # and quantising to 256 levels costs little


@pytest.fixture(scope="module")
def cip(real_ct_dir):
    ct = load_ct(real_ct_dir / "cip_ct64" / "ct.nii.gz")
    reference = load_ct(real_ct_dir / "cip_ct64" / "wholelung_ref.nii.gz").hu > 0
    return ct, reference


def _lung_watershed_case(ct):
    """The refined mask's two-label problem on a real scan: lung markers vs the outer ring."""
    lung, _ = lung_air(ct.hu, ct.spacing)
    distance = ndi.distance_transform_edt(~lung, sampling=ct.spacing)
    markers = np.where(lung, 2, np.where(distance > 9.0, 1, 0)).astype(np.int32)
    volume = ct.hu.astype(np.float32)
    edge = np.sqrt(sum((ndi.sobel(volume, axis=a) / s) ** 2 for a, s in enumerate(ct.spacing)))
    return edge, markers, distance <= 14.0


def test_flood_matches_skimage_on_real_ct_edges(cip):
    edge, markers, mask = _lung_watershed_case(cip[0])
    levels = quantize_edges(edge, mask, 256)
    ours = flood_numpy(levels, markers, mask)
    band = mask & (markers == 0)
    assert (ours == watershed_ref(levels, markers, mask=mask))[band].mean() >= 0.999
    assert (ours == watershed_ref(edge, markers, mask=mask))[band].mean() >= 0.995
    np.testing.assert_array_equal(
        watershed(edge, markers, mask, backend="cpu"), watershed_ref(levels, markers, mask=mask)
    )


# --- watershed: the CUDA kernel ---------------------------------------------------------------


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("itemsize", [1, 2])
@pytest.mark.parametrize("connectivity", [1, 3])
def test_watershed_kernel_compiles_with_nvcc(tmp_path, itemsize, connectivity):
    defines = watershed_flood_defines(itemsize, connectivity)
    name = dict(defines)["FLOOD_KERNEL"]
    source = tmp_path / f"{name}.cu"
    source.write_text(kernel_source(WATERSHED_FILE, defines))
    ptx = tmp_path / f"{name}.ptx"
    cmd = ["nvcc", "--ptx", "-arch=sm_90", "-std=c++14", str(source), "-o", str(ptx)]
    subprocess.run(cmd, check=True, capture_output=True)
    entries = [line for line in ptx.read_text().splitlines() if ".entry" in line]
    assert len(entries) == 1 and name in entries[0]  # C++-mangled, found by name expression


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(64, 64), (24, 40, 48)])
def test_flood_gpu_equals_numpy_twin(shape):
    import cupy

    from sapsam_jax.preprocess._watershed import flood_gpu

    edge, markers, mask = _random_case(shape, np.random.default_rng(0))
    levels = quantize_edges(edge, mask, 256)
    for connectivity in (1, 2):
        twin = flood_numpy(levels, markers, mask, connectivity)
        gpu = flood_gpu(
            cupy.asarray(levels), cupy.asarray(markers), cupy.asarray(mask), connectivity
        )
        np.testing.assert_array_equal(cupy.asnumpy(gpu), twin)


@pytest.mark.gpu
def test_flood_gpu_equals_twin_and_skimage_on_real_ct(cip):
    import cupy

    from sapsam_jax.preprocess._watershed import flood_gpu

    edge, markers, mask = _lung_watershed_case(cip[0])
    levels = quantize_edges(edge, mask, 256)
    gpu = cupy.asnumpy(flood_gpu(*(cupy.asarray(a) for a in (levels, markers, mask))))
    np.testing.assert_array_equal(gpu, flood_numpy(levels, markers, mask))
    band = mask & (markers == 0)
    assert (gpu == watershed_ref(edge, markers, mask=mask))[band].mean() >= 0.995


# --- masks: API and a synthetic chest ---------------------------------------------------------


def chest_phantom(spacing, seed=0):
    """Body on a table and mattress, two ellipsoid lungs (-850 HU), a trachea from the top, and
    a 13 mm soft-tissue ball in the right lung with broad contact to its lateral wall."""
    extent_mm = (160.0, 280.0, 320.0)
    sizes = [round(e / s) for e, s in zip(extent_mm, spacing, strict=True)]
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(sizes, spacing, strict=True)]
    k, j, i = np.meshgrid(*axes, indexing="ij")
    hu = np.full(k.shape, -1000.0)
    body = (j / 110) ** 2 + (i / 150) ** 2 <= 1
    hu[body] = 40.0
    hu[(j > 115) & (j < 119) & (np.abs(i) < 150)] = 200.0  # table shell
    hu[(j >= 110) & (j <= 115) & (np.abs(i) < 150) & ~body] = -700.0  # mattress foam
    lungs = np.zeros(k.shape, bool)
    for side in (-1, 1):
        lungs |= (k / 65) ** 2 + ((j + 5) / 70) ** 2 + ((i - side * 62) / 45) ** 2 <= 1
    hu[lungs] = -850.0
    hu[(np.abs(i) <= 7) & (np.abs(j + 20) <= 7) & (k > 20)] = -1000.0  # trachea
    ball = lungs & ((k**2 + (j + 5) ** 2 + (i + 99) ** 2) <= 13**2)
    hu[ball] = 40.0
    hu += np.random.default_rng(seed).normal(0.0, 15.0, hu.shape)
    return np.round(hu).astype(np.int16), lungs & ~ball, ball


@pytest.mark.parametrize("spacing", [(5.0, 2.5, 2.5), (2.5, 2.0, 2.0)])
def test_refined_mask_takes_in_a_juxtapleural_ball(spacing):
    hu, lung, ball = chest_phantom(spacing)
    masks = lung_masks(hu, spacing)
    conservative, refined = masks["conservative"], masks["refined"]
    assert dice(conservative, lung) >= 0.99
    assert conservative[ball].mean() <= 0.1
    assert refined[ball].mean() >= 0.6
    assert not (refined & ~lung & ~ball).any()  # no body wall, trachea, mattress or table
    np.testing.assert_array_equal(lung_mask(hu, spacing, method="conservative"), conservative)


@pytest.mark.parametrize("patient", [1, 3])
def test_masks_on_synthetic_cpa_phantoms(patient):
    """The cohort generator's phantoms (data.synthetic) carry the true lung and sign labels."""
    from sapsam_jax.data.synthetic import LABELS, generate_patient

    scan = generate_patient(patient, cpa=True, seed=1)[0]
    masks = lung_masks(scan.hu, scan.grid.spacing)
    signs = {name: scan.labels == LABELS[name] for name in ("cavity", "fungus_ball")}
    pleura = scan.labels == LABELS["pleural_thickening"]
    # The conservative mask leaves soft-tissue signs out by design (paper 2.1), so its reference
    # is the lung without the fungus balls and the pleural thickening (its fibrotic rim).
    soft_tissue = pleura | signs["fungus_ball"]
    assert dice(masks["conservative"], scan.lung & ~soft_tissue) >= 0.98
    assert dice(masks["refined"], scan.lung) >= 0.98
    assert masks["conservative"][signs["cavity"]].mean() >= 0.8  # the air, not all the wall
    for sign in signs.values():
        assert masks["refined"][sign].mean() >= 0.95
    assert masks["refined"][pleura].mean() >= masks["conservative"][pleura].mean() + 0.2


def test_a_trachea_touching_a_lung_is_followed_down(spacing=(2.5, 2.0, 2.0)):
    # A thin, partial-volume bridge (-800 HU) joins the trachea to the right lung over 10 mm;
    # the chain of small cross-sections ends there and the trachea below stayed in the masks.
    hu, lungs, _ = chest_phantom(spacing)
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(hu.shape, spacing, strict=True)]
    k, j, i = np.meshgrid(*axes, indexing="ij")  # mm, as in chest_phantom
    trachea = (np.abs(i) <= 7) & (np.abs(j + 20) <= 7) & (k > 20)
    bridge = (k > 40) & (k <= 50) & (np.abs(j + 20) <= 2) & (i < -7) & (i > -30) & ~lungs
    hu[bridge] = -800
    masks = lung_masks(hu, spacing)
    for name, mask in masks.items():
        assert not (mask & trachea).any(), name
        assert dice(mask & ~bridge, lungs & ~trachea) >= 0.97, name


def test_lung_mask_api():
    hu, lung, _ = chest_phantom((5.0, 4.0, 4.0))
    mask = lung_mask(hu, (5.0, 4.0, 4.0))
    assert isinstance(mask, np.ndarray) and mask.dtype == bool and mask.shape == hu.shape
    no_lungs = np.full((8, 32, 32), 40, np.int16)
    assert not lung_mask(no_lungs, (5.0, 4.0, 4.0), method="conservative").any()
    with pytest.raises(ValueError, match="unknown method"):
        lung_mask(hu, (5.0, 4.0, 4.0), method="watershed")
    with pytest.raises(ValueError, match="spacing"):
        lung_mask(hu, (5.0, 4.0))


# --- masks on real scans ----------------------------------------------------------------------


def _outside_air(hu):
    """Air connected to the border of its axial slice."""
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = ndi.generate_binary_structure(2, 1)
    labels, _ = ndi.label(hu < -570, structure=structure)
    rim = np.concatenate([labels[:, [0, -1]].ravel(), labels[:, :, [0, -1]].ravel()])
    return np.isin(labels, rim[rim > 0])


def _assert_no_leak(hu, spacing, mask):
    litres = mask.sum() * np.prod(spacing) / 1e6
    assert 2.0 <= litres <= 8.0
    assert not (mask & (hu > HU_BONE)).any()
    assert not (ndi.binary_dilation(mask) & _outside_air(hu)).any()


def test_masks_match_cip_reference(cip):
    ct, reference = cip
    masks = lung_masks(ct.hu, ct.spacing)
    scores = {name: dice(mask, reference) for name, mask in masks.items()}
    print(f"cip_ct64 Dice vs wholelung_ref: {scores}")
    assert scores["conservative"] >= 0.97
    assert scores["refined"] >= 0.97
    for mask in masks.values():
        _assert_no_leak(ct.hu, ct.spacing, mask)


def test_masks_leave_out_the_cip_airway(cip, real_ct_dir):
    # lung_LR_ref labels the trachea and main bronchi 3. Here the trachea touches the right lung
    # through partial volume 60 mm above the carina, where the chain of small cross-sections
    # ended: 0.40 of the trachea and 0.55 of the labelled airway stayed in both masks.
    ct, _ = cip
    airway = load_ct(real_ct_dir / "cip_ct64" / "lung_LR_ref.nii.gz").hu == 3
    carina = max(k for k in range(airway.shape[0]) if ndi.label(airway[k])[1] > 1)
    trachea = airway.copy()
    trachea[: carina + 1] = False
    for name, mask in lung_masks(ct.hu, ct.spacing).items():
        assert (mask & trachea).sum() <= 0.01 * trachea.sum(), name
        assert (mask & airway).sum() <= 0.15 * airway.sum(), name


def _tumour_scan(real_ct_dir, source, boxes_file):
    """The scan and its tumour boxes as array slices (the slice found by z_mm)."""
    ct = load_ct(real_ct_dir / "lung_pet_ct_dx" / source)
    z0, z1 = ct.index_to_lps([[0, 0, 0], [1, 0, 0]])[:, 2]
    boxes = []
    for box in json.loads((real_ct_dir / "lung_pet_ct_dx" / boxes_file).read_text()):
        k = int(round((box["z_mm"] - z0) / (z1 - z0)))
        rows = slice(box["row_min"], box["row_max"] + 1)  # rows are j, columns i
        cols = slice(box["col_min"], box["col_max"] + 1)
        boxes.append((k, rows, cols))
    return ct.hu, ct.spacing, boxes


def _tumour_fraction(hu, mask, boxes) -> float:
    """Fraction of the boxes' soft-tissue voxels that the mask holds."""
    inside = [(mask[box] & (hu[box] > SOFT_TISSUE_HU)).sum() for box in boxes]
    tissue = [(hu[box] > SOFT_TISSUE_HU).sum() for box in boxes]
    return float(np.sum(inside) / np.sum(tissue))


@pytest.mark.parametrize(
    "source, boxes_file",
    [
        ("A0001_chest_5mm_dicom", "A0001_tumour_bboxes.json"),
        ("A0002_thorax_8mm_ct.nii.gz", "A0002_tumour_bboxes.json"),
    ],
)
def test_refined_mask_takes_in_tumours_without_leaking(real_ct_dir, source, boxes_file):
    hu, spacing, boxes = _tumour_scan(real_ct_dir, source, boxes_file)
    masks = lung_masks(hu, spacing)
    fractions = {name: _tumour_fraction(hu, mask, boxes) for name, mask in masks.items()}
    print(f"{source} tumour soft tissue inside the mask: {fractions}")
    assert fractions["refined"] >= 0.35
    assert fractions["refined"] >= fractions["conservative"] + 0.25
    for mask in masks.values():
        _assert_no_leak(hu, spacing, mask)


def test_masks_hold_only_the_lung_bases_of_an_abdomen_scan(real_ct_dir):
    folder = real_ct_dir / "totalseg_abdomen"
    ct = load_ct(folder / "example_ct_sm.nii.gz")  # RAS on disk, canonical LPS here
    labels = load_ct(folder / "example_seg.nii.gz").hu
    lungs = np.isin(labels, [10, 11, 12, 13, 14])  # TotalSegmentator lung lobes
    far = ndi.distance_transform_edt(~lungs, sampling=ct.spacing) > 10.0
    masks = lung_masks(ct.hu, ct.spacing)
    scores = {name: dice(mask, lungs) for name, mask in masks.items()}
    print(f"totalseg_abdomen Dice vs lung lobes 10-14: {scores}")
    for name, mask in masks.items():
        assert scores[name] >= 0.92
        assert not (mask & far).any()  # no bowel gas, no mattress


@pytest.mark.parametrize("beyond_mm", [3.0, 10.0])
def test_a_field_of_view_that_cuts_a_lung_keeps_its_slices(real_ct_dir, beyond_mm):
    # Small fields of view (0.44 mm pixels in the paper's cohort) cut the lungs at the image
    # edge; there the body does not enclose the lung in its slice. Before, those slices lost
    # the whole lung (A0002 cut 10 mm into the right lung: 0.32 of it kept).
    ct = load_ct(real_ct_dir / "lung_pet_ct_dx" / "A0002_thorax_8mm_ct.nii.gz")
    whole = lung_masks(ct.hu, ct.spacing)
    start = int(np.flatnonzero(whole["refined"].any(axis=(0, 1)))[0])
    cut = start + int(round(beyond_mm / ct.spacing[2]))  # the first i column kept
    masks = lung_masks(np.ascontiguousarray(ct.hu[:, :, cut:]), ct.spacing)
    right = np.zeros(masks["refined"].shape, bool)
    right[:, :, : ct.hu.shape[2] // 2 - cut] = True  # the patient's right: low i
    for name, mask in masks.items():
        truth = whole[name][:, :, cut:]
        kept = (mask & truth & right).sum() / (truth & right).sum()
        assert kept >= 0.95, (name, kept)
        assert dice(mask, truth) >= 0.97, name


@pytest.mark.gpu
def test_gpu_masks_match_cpu(cip, real_ct_dir):
    import cupy

    ct, _ = cip
    hu, spacing, _ = _tumour_scan(real_ct_dir, "A0001_chest_5mm_dicom", "A0001_tumour_bboxes.json")
    for volume, step in ((ct.hu, ct.spacing), (hu, spacing)):
        cpu = lung_masks(volume, step, backend="cpu")
        gpu = lung_masks(cupy.asarray(volume), step)
        for name, mask in gpu.items():
            assert isinstance(mask, cupy.ndarray) and mask.dtype == bool
            assert dice(cupy.asnumpy(mask), cpu[name]) >= 0.99, name
