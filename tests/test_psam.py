"""PSAM back-projection to the working grid and the CT, 3-D PSAMs, localisation scores."""

import json
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
from flax import nnx

from sapsam_jax.config import AXES, SUBREGIONS, GeometryConfig
from sapsam_jax.explain import (
    backproject,
    distance_to_lesion_mm,
    energy_inside,
    explain_study,
    localisation_report,
    localisation_scores,
    locate_maximum,
    pointing_game,
    psam_3d,
    psam_to_ct,
    rotation_angles,
    working_volume_to_ct,
)
from sapsam_jax.preprocess import (
    ct_to_working,
    grid_mapping,
    rotate_volume,
    subregion_image_shape,
    subregion_slices,
    working_to_ct,
)

WORKING = (24, 20, 16)  # (k, j, i): sub-regions of (8, 20, 8)
CT_SHAPE = (40, 50, 44)
SPACING = (2.5, 0.8, 0.8)
BBOX = (slice(4, 34), slice(5, 45), slice(2, 42))


@pytest.fixture
def mapping():
    return grid_mapping(CT_SHAPE, SPACING, BBOX, WORKING)


def _blob(shape, centre, sigma=1.5):
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    d2 = sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True))
    return np.exp(-d2 / (2 * sigma**2)).astype(np.float32)


def _rotate(volume, index):
    """Augmentation ``index`` as preprocessing applies it (rotate_volume fills with fill_hu)."""
    fill = GeometryConfig().fill_hu
    angles = GeometryConfig().rotations()[index]
    return rotate_volume(volume + fill, angles, config=GeometryConfig()) - fill


@pytest.mark.parametrize("axis", list(AXES))
def test_backproject_spreads_map_along_rays_of_the_subregion(axis, rng):
    region = subregion_slices(WORKING)["left_middle"]
    shape = subregion_image_shape(WORKING, axis)
    map2d = rng.random(shape).astype(np.float32)
    volume = backproject(map2d, axis, "left_middle", WORKING)
    a = AXES[axis]
    np.testing.assert_allclose(volume[region].mean(axis=a), map2d, rtol=1e-6)
    np.testing.assert_allclose(volume[region].min(axis=a), volume[region].max(axis=a))
    outside = volume.copy()
    outside[region] = 0
    assert not outside.any()


def test_backproject_resizes_model_sized_maps():
    # A model-input-sized (e.g. 32x32) map goes back to the (20, 8) axial sub-region image.
    volume = backproject(np.ones((32, 32)), "axial", "right_upper", WORKING)
    region = subregion_slices(WORKING)["right_upper"]
    np.testing.assert_allclose(volume[region], 1.0, rtol=1e-6)
    assert volume.sum() == pytest.approx(np.prod(volume[region].shape))


def test_whole_scan_map_covers_the_working_volume():
    volume = backproject(np.full((20, 16), 2.0), "axial", None, WORKING)
    np.testing.assert_allclose(volume, 2.0)


def test_working_to_ct_puts_a_voxel_where_working_to_ct_says(mapping):
    centre = np.array([13.0, 7.0, 11.0])
    ct = working_volume_to_ct(_blob(WORKING, centre), mapping)
    assert ct.shape == CT_SHAPE and ct.dtype == np.float32
    expected = working_to_ct(centre, mapping)
    peak = np.array(np.unravel_index(np.argmax(ct), CT_SHAPE))
    assert np.all(np.abs(peak - expected) <= 1.0), (peak, expected)
    # Nothing lands outside the crop box of the mapping.
    box = np.zeros(CT_SHAPE, dtype=bool)
    box[BBOX] = True
    assert not ct[~box].any()


def test_working_grid_footprint_is_the_crop_box(mapping):
    # Each working voxel covers [w - 0.5, w + 0.5]: a full volume of ones lands exactly on the
    # crop box, edge CT slices included (half a working voxel past the outer voxel centres).
    ct = working_volume_to_ct(np.ones(WORKING, np.float32), mapping)
    box = np.zeros(CT_SHAPE, dtype=bool)
    box[BBOX] = True
    np.testing.assert_allclose(ct[box], 1.0, rtol=1e-6)
    assert not ct[~box].any()


def test_rotation_is_undone():
    # A blob seen in the rotated frame of augmentation index 0 (-5, -5, -5 degrees), taken back
    # with rotation=0, lands where the unrotated blob does (preprocess.rotate_volume convention).
    working, ct_shape = (40, 40, 40), (60, 70, 70)
    mapping = grid_mapping(
        ct_shape, (2.0, 1.0, 1.0), (slice(5, 55),) + (slice(5, 65),) * 2, working
    )
    blob = _blob(working, (10.0, 28.0, 28.0), sigma=3.0)  # off-centre, so rotation moves it
    rotated = _rotate(blob, 0)
    plain = working_volume_to_ct(blob, mapping)
    error = np.abs(working_volume_to_ct(rotated, mapping, rotation=0) - plain).max()
    assert error < 0.06
    # Undoing the opposite rotation (index 26) or none misplaces it.
    assert np.abs(working_volume_to_ct(rotated, mapping, rotation=26) - plain).max() > 0.5
    assert np.abs(working_volume_to_ct(rotated, mapping) - plain).max() > 0.3
    # Index 13 is the identity.
    np.testing.assert_array_equal(working_volume_to_ct(blob, mapping, rotation=13), plain)


def test_a_slice_outside_the_ct_is_refused(mapping):
    volume = np.ones(tuple(mapping["working_shape"]), np.float32)
    for k in (-1, CT_SHAPE[0]):
        with pytest.raises(ValueError, match="not a slice of the CT"):
            working_volume_to_ct(volume, mapping, ct_k=k)


def test_psam_to_ct_reads_the_map_along_its_rays(mapping, rng):
    map2d = rng.random(subregion_image_shape(WORKING, "coronal")).astype(np.float32)
    direct = psam_to_ct(map2d, axis="coronal", subregion="right_lower", mapping=mapping)
    # Independently: each CT voxel inside the sub-region (working coordinates from the mapping)
    # holds the map bilinearly read at its (k, i); the coronal ray runs along j.
    bounds = [
        r.indices(n) for r, n in zip(subregion_slices(WORKING)["right_lower"], WORKING, strict=True)
    ]
    (k0, k1, _), _, (i0, i1, _) = bounds
    grid = np.stack(np.meshgrid(*map(np.arange, CT_SHAPE), indexing="ij"), axis=-1)
    w = ct_to_working(grid, mapping)
    inner = np.all(
        [(w[..., d] >= lo) & (w[..., d] <= hi - 1) for d, (lo, hi, _) in enumerate(bounds)], axis=0
    )
    expected = ndi.map_coordinates(map2d, [w[inner][:, 0] - k0, w[inner][:, 2] - i0], order=1)
    assert inner.sum() > 1000
    np.testing.assert_allclose(direct[inner], expected, rtol=1e-5, atol=1e-6)
    # Farther than a working voxel outside the sub-region: nothing.
    outer = (w[..., 0] < k0 - 1) | (w[..., 0] > k1) | (w[..., 2] < i0 - 1) | (w[..., 2] > i1)
    assert not direct[outer].any()
    volume = backproject(map2d, "coronal", "right_lower", WORKING)
    for k in (0, 7, 20, 39):  # one axial CT slice alone matches the volume's slice
        np.testing.assert_array_equal(working_volume_to_ct(volume, mapping, ct_k=k), direct[k])


@pytest.mark.parametrize("rotation", [None, 5, 20])
def test_psam_3d_finds_a_lesion_in_depth(rotation):
    # A working grid large enough, and a lesion far enough from its centre, that a +-5 degree
    # rotation moves the lesion by ~4 CT voxels: more than the tolerance, so a PSAM whose
    # rotation is not undone misses.
    working = (60, 60, 60)
    mapping = grid_mapping(
        (80, 90, 90), (2.0, 1.0, 1.0), (slice(10, 70),) + (slice(15, 75),) * 2, working
    )
    centre = np.array([45.0, 10.0, 48.0])  # inside left_upper: k 40..59, i 30..59
    region = subregion_slices(working)["left_upper"]
    volume = _blob(working, centre, sigma=2.0)
    if rotation is not None:
        volume = _rotate(volume, rotation)
    maps = {axis: volume[region].mean(axis=a) for axis, a in AXES.items()}
    psam = psam_3d(maps, "left_upper", working)
    affine = np.diag([2.0, 1.0, 1.0, 1.0])
    peak = locate_maximum(psam, mapping, affine, rotation=rotation)
    expected_ct = working_to_ct(centre, mapping)
    assert np.linalg.norm(np.subtract(peak["ct_index"], expected_ct)) <= 2.0
    if rotation is not None:
        as_if_unrotated = locate_maximum(psam, mapping, affine)["ct_index"]
        assert np.linalg.norm(np.subtract(as_if_unrotated, expected_ct)) > 3.0
    assert peak["subregion"] == "left_upper"
    np.testing.assert_allclose(peak["lps_mm"], np.multiply(peak["ct_index"], (2.0, 1.0, 1.0)))
    assert 0 < peak["relative"]["superior"] < 1 and peak["relative"]["left"] > 0.5


def test_psam_3d_geometric_mean_and_zero_maps():
    ones = {a: np.ones(subregion_image_shape(WORKING, a)) for a in AXES}
    region = subregion_slices(WORKING)["right_upper"]
    volume = psam_3d(ones, "right_upper", WORKING)
    np.testing.assert_allclose(volume[region], 1.0, rtol=1e-6)
    assert volume.sum() == pytest.approx(volume[region].size, rel=1e-6)
    ones["axial"] = np.zeros_like(ones["axial"])  # one silent view silences the voxel (AND)
    assert not psam_3d(ones, "right_upper", WORKING).any()
    with pytest.raises(ValueError):
        psam_3d({"oblique": np.ones((2, 2))}, None, WORKING)


def test_a_zero_psam_has_no_maximum(mapping, rng):
    # One view's Grad-CAM all zero (ReLU) makes the geometric mean zero everywhere: its arg-max
    # would be the lung-box corner, which is no finding.
    maps = {a: rng.random(subregion_image_shape(WORKING, a)) for a in AXES}
    maps["sagittal"] = np.zeros_like(maps["sagittal"])
    volume = psam_3d(maps, "left_upper", WORKING)
    assert locate_maximum(volume, mapping, np.eye(4)) is None
    assert locate_maximum(np.zeros(WORKING), mapping) is None


def test_rotation_indices_are_the_27_of_the_papers_table(mapping):
    assert rotation_angles(0) == (-5.0, -5.0, -5.0) and rotation_angles(26) == (5.0, 5.0, 5.0)
    assert rotation_angles(np.int64(13)) is None  # the identity
    assert rotation_angles((0.0, 10.0, 0.0)) == (0.0, 10.0, 0.0)  # other tables: their angles
    for bad in (-1, 27, 2.7, 5.0, True):  # -1 would read index 26, 2.7 index 2
        with pytest.raises(ValueError, match=f"integer 0-26, got {bad!r}"):
            rotation_angles(bad)
    with pytest.raises(ValueError, match="integer 0-26, got -1"):
        working_volume_to_ct(np.ones(WORKING, np.float32), mapping, rotation=-1)
    # A run's own table (view_maps): the same rule.
    from types import SimpleNamespace

    from sapsam_jax.config import QUICK
    from sapsam_jax.explain._study import rotation_of

    run = SimpleNamespace(cache=SimpleNamespace(config=QUICK))
    assert rotation_of(run, 26) == (26, (5.0, 5.0, 5.0))
    assert rotation_of(run, None) == (13, (0.0, 0.0, 0.0))
    for bad in (2.7, True, 27):  # int() made 2.7 index 2 and True index 1
        with pytest.raises(ValueError, match=f"integer 0-26, got {bad!r}"):
            rotation_of(run, bad)


# ----------------------------------------------------------------- a study with lesion truth

STUDY_CT = (36, 40, 40)
STUDY_SPACING = (3.0, 2.0, 2.0)
STUDY_GEOMETRY = GeometryConfig(grid_shape=(48, 32, 32))  # working (24, 16, 16)
# Inside left_middle (working k 8-15, i 8-15; CT k 12-23, i 20-39) and off the CT's centre on
# every axis, so a map put back mirrored in k, j or i lands 12, 20 or 38 mm from the lesion.
LESION_CENTRE_CT = (19.5, 14.5, 28.5)


class Brightness(nnx.Module):
    """Feature map = channel 0; logits = (-1, +1) x its mean (GAP -> linear).

    Grad-CAM of class 1 is the channel-0 image itself (closed form), so a run on images that
    show the lesion localises perfectly; ``sign=-1`` looks away and its maps are all zero.
    """

    layer_names = ("bright",)
    default_cam_layer = "bright"

    def __init__(self, sign=1.0):
        self.weights = nnx.Param(jnp.array([[-sign, sign]], jnp.float32))

    def forward_to(self, x, layer):
        return jax.nn.relu(x[..., :1])

    def forward_from(self, h, layer):
        return h.mean(axis=(1, 2)) @ self.weights[...]


class FakeCache:
    """The ProjectionCache reader interface over in-memory arrays."""

    def __init__(self, meta, bands, lesions, geometry=STUDY_GEOMETRY):
        self.study_ids = [meta["study_id"]]
        self._meta, self._bands, self._lesions = meta, bands, lesions
        self.config, self.path = SimpleNamespace(geometry=geometry), Path("fake-cache")

    def __contains__(self, study_id):
        return study_id in self.study_ids

    def meta(self, study_id):
        return self._meta

    def bands(self, study_id, axis):
        return self._bands[axis]

    def lesions(self, study_id, axis):
        return self._lesions[axis]


def _ct_volume(hu):
    from sapsam_jax.io import CTVolume

    dk, dj, di = STUDY_SPACING
    affine = np.array([[0, 0, di, -40.0], [0, dj, 0, -30.0], [dk, 0, 0, 100.0], [0, 0, 0, 1]])
    return CTVolume(hu=hu.astype(np.int16), spacing=STUDY_SPACING, affine=affine)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return _write_study(tmp_path_factory.mktemp("study"))


def _write_study(root):
    """CT + label map (a fungus ball in left_middle, a cavity in right_upper) on disk, and the
    cache view of them: lesion projections, band images that show the fungus ball, and the
    meta.json preprocessing writes (source files and their fingerprint, the mapping)."""
    from sapsam_jax.data._cohort import source_fingerprint
    from sapsam_jax.io import save_nifti
    from sapsam_jax.preprocess import lesion_projections

    grids = np.meshgrid(
        *[np.arange(n) * s for n, s in zip(STUDY_CT, STUDY_SPACING, strict=True)], indexing="ij"
    )
    centre_mm = np.multiply(LESION_CENTRE_CT, STUDY_SPACING)
    ball = sum((g - c) ** 2 for g, c in zip(grids, centre_mm, strict=True)) <= 8.0**2
    labels = np.zeros(STUDY_CT, np.int16)
    labels[ball] = 2
    labels[26:30, 10:16, 4:10] = 1
    hu = np.where(ball, 20, -800)
    ct = _ct_volume(hu)
    save_nifti(root / "ct.nii.gz", hu.astype(np.int16), ct)
    save_nifti(root / "labels.nii.gz", labels, ct)
    bbox = tuple(slice(0, n) for n in STUDY_CT)
    mapping = grid_mapping(STUDY_CT, STUDY_SPACING, bbox, STUDY_GEOMETRY.working_shape)
    lesions = lesion_projections(labels, STUDY_SPACING, bbox, STUDY_GEOMETRY)
    bands = {}
    for axis, masks in lesions.items():
        image = np.full(masks.shape, 0.2, np.float16)
        image[..., 0] = masks[..., 1]  # channel 0 shows the fungus ball only
        bands[axis] = np.broadcast_to(image, (27, *image.shape))
    meta = {
        "study_id": "S1",
        "patient_id": "P1",
        "mapping": mapping,
        "ct_path": str(root / "ct.nii.gz"),
        "lesion_labels_path": str(root / "labels.nii.gz"),
    }
    files = SimpleNamespace(path=meta["ct_path"], lesion_labels=meta["lesion_labels_path"])
    meta["source_fingerprint"] = source_fingerprint(files)
    return FakeCache(meta, bands, lesions)


def _runs(cache, sign=1.0, axes=tuple(AXES), root="runs", seed=0, test=("P1",)):
    from sapsam_jax.train._step import StepSpec

    return [
        SimpleNamespace(
            workdir=f"{root}/{axis}",
            config=SimpleNamespace(
                task="signs",
                axis=axis,
                sign="fungus_ball",
                cache="c",
                arch="vgg19",
                width=1.0,
                seed=seed,
            ),
            model=Brightness(sign),
            multi_label=False,
            split={"train": [], "val": [], "test": list(test)},
            cache=cache,
            step_spec=StepSpec((32, 32), "none", augment=False),  # maps come back resized
        )
        for axis in axes
    ]


def test_localisation_of_a_perfect_localiser(study):
    scores = localisation_scores(_runs(study), "test", tolerance_px=1)
    fungus = scores["signs"]["fungus_ball"]
    assert set(fungus) == {*AXES, "3d"}
    for axis in AXES:
        assert fungus[axis]["n"] == 1 and fungus[axis]["pointing_game"] == 1.0
        assert fungus[axis]["n_detected"] == 1 and fungus[axis]["pointing_game_detected"] == 1.0
        assert fungus[axis]["energy_inside"] > max(0.6, 2 * fungus[axis]["energy_chance"])
    assert fungus["3d"]["n"] == 1 and fungus["3d"]["pointing_game"] == 1.0
    assert fungus["3d"]["distance_mm_median"] <= 2.0
    assert fungus["3d"]["energy_inside"] > 2 * fungus["3d"]["energy_chance"]
    record = [r for r in scores["records"] if r["axis"] == "3d"][0]
    assert record["subregion"] == "left_middle"
    assert record["maximum"]["subregion"] == "left_middle"


def test_localisation_of_maps_that_look_away(study):
    scores = localisation_scores(_runs(study, sign=-1.0, axes=("axial",)), "test")
    axial = scores["signs"]["fungus_ball"]["axial"]
    assert axial["pointing_game"] == 0.0 and axial["energy_inside"] == 0.0
    assert axial["n_detected"] == 0 and np.isnan(axial["pointing_game_detected"])  # p < 0.5
    assert "3d" not in scores["signs"]["fungus_ball"]


def test_localisation_of_a_psam_without_maximum(study):
    runs = _runs(study)
    runs[2].model = Brightness(-1.0)  # sagittal: all-zero maps, so the 3-D PSAM is zero
    scores = localisation_scores(runs, "test")
    three_d = scores["signs"]["fungus_ball"]["3d"]
    assert three_d["n"] == 1 and three_d["n_no_peak"] == 1 and three_d["pointing_game"] == 0.0
    assert np.isnan(three_d["distance_mm_mean"]) and np.isnan(three_d["distance_mm_median"])
    record = [r for r in scores["records"] if r["axis"] == "3d"][0]
    assert record["maximum"] is None and not record["hit"]


def test_distances_are_summarised_over_psams_with_a_maximum():
    from sapsam_jax.explain._localisation import _summarise

    row = {"axis": "3d", "probability": 0.9, "method": "gradcam", "layer": "conv"}
    row |= {"energy_inside": 0.5, "energy_chance": 0.1}
    rows = [
        row | {"hit": True, "distance_mm": 2.0, "maximum": {"value": 1.0}},
        row | {"hit": True, "distance_mm": 4.0, "maximum": {"value": 1.0}},
        row | {"hit": False, "distance_mm": float("inf"), "maximum": None},
    ]
    summary = _summarise(rows)["3d"]
    assert summary["distance_mm_mean"] == 3.0 and summary["distance_mm_median"] == 3.0
    assert summary["n"] == 3 and summary["n_no_peak"] == 1
    assert summary["pointing_game"] == pytest.approx(2 / 3)


def test_localisation_refuses_labels_off_the_ct_grid(tmp_path):
    from sapsam_jax.data._cache import CacheError
    from sapsam_jax.data._cohort import source_fingerprint
    from sapsam_jax.io import CTVolume, save_nifti

    cache = _write_study(tmp_path)
    meta = cache.meta("S1")
    ct = _ct_volume(np.zeros(STUDY_CT))
    shifted = ct.affine.copy()
    shifted[:3, 3] += 5.0  # saved with a wrong origin: every lesion 8.7 mm off
    labels = np.zeros(STUDY_CT, np.int16)
    save_nifti(meta["lesion_labels_path"], labels, CTVolume(labels, STUDY_SPACING, shifted))
    with pytest.raises(CacheError, match=r"study S1: the lesion label map .*labels\.nii\.gz chan"):
        localisation_scores(_runs(cache), "test")  # rewritten since the cache was built
    files = SimpleNamespace(path=meta["ct_path"], lesion_labels=meta["lesion_labels_path"])
    meta["source_fingerprint"] = source_fingerprint(files)  # as if the cache were built so
    with pytest.raises(CacheError, match=r"study S1: lesion labels .*labels\.nii\.gz .*off"):
        localisation_scores(_runs(cache), "test")


def test_localisation_uses_the_runs_map_settings(study):
    runs = _runs(study, axes=("axial",))
    runs[0].config.cam_method, runs[0].config.cam_layer = "hirescam", "bright"
    axial = localisation_scores(runs, "test", three_d=False)["signs"]["fungus_ball"]["axial"]
    assert (axial["method"], axial["layer"]) == ("hirescam", "bright")
    assert axial["pointing_game"] == 1.0  # HiResCAM of a GAP -> linear head is Grad-CAM
    asked = localisation_scores(runs, "test", method="gradcam++", three_d=False)
    assert asked["signs"]["fungus_ball"]["axial"]["method"] == "gradcam++"
    runs[0].config.cam_layer = "block2_conv2"  # a preset layer this model lacks: its last one
    axial = localisation_scores(runs, "test", three_d=False)["signs"]["fungus_ball"]["axial"]
    assert axial["layer"] == "bright"


def test_localisation_report_rows(study):
    rows = localisation_report(_runs(study), "test")
    assert {(r["sign"], r["axis"]) for r in rows} == {("fungus_ball", a) for a in (*AXES, "3d")}
    assert all({"n", "pointing_game", "energy_inside"} <= set(r) for r in rows)
    assert {tuple(r["workdirs"]) for r in rows if r["axis"] == "axial"} == {("runs/axial",)}
    assert len([r for r in rows if r["axis"] == "3d"][0]["workdirs"]) == 3


def test_localisation_report_keeps_run_sets_apart(study):
    from sapsam_jax.evaluate._report import _localisation_lines

    runs = _runs(study, root="a/seed0", axes=("axial",)) + _runs(
        study, root="a/seed1", seed=1, axes=("axial",)
    )
    rows = localisation_report(runs, "test")
    assert sorted(tuple(r["workdirs"]) for r in rows) == [("a/seed0/axial",), ("a/seed1/axial",)]
    table = "\n".join(_localisation_lines(rows))
    assert "fungus_ball (seed0/axial)" in table and "fungus_ball (seed1/axial)" in table

    # The same layout under two experiment roots: told apart by the part that differs.
    entry = {"sign": "cavity", "axis": "axial", "n": 3, "pointing_game": 1.0}
    entry |= {"energy_inside": 0.5, "energy_chance": 0.1}
    rows = [entry | {"workdirs": [f"/exp/{lr}/signs-axial-all/cavity"]} for lr in ("a", "b")]
    table = "\n".join(_localisation_lines(rows))
    assert "| cavity (a/signs-axial-all/cavity) |" in table
    assert "| cavity (b/signs-axial-all/cavity) |" in table
    # No map called positive: the detected pointing game is undefined, n/a like Table 2's cells.
    assert "| 1.00 | n/a (0) | 0.50 (0.10) |" in table and "nan" not in table


def test_explain_study_writes_fig3_and_3d_psam(study, tmp_path):
    import nibabel as nib

    summary = explain_study(_runs(study), "S1", tmp_path, subregions=["left_middle"])
    entry = summary["labels"]["fungus_ball"]["left_middle"]
    for axis in AXES:
        assert Path(entry["figures"][axis]).stat().st_size > 10_000
    peak = entry["psam3d"]["maximum"]
    lesion_lps = _ct_volume(np.zeros(STUDY_CT)).index_to_lps(LESION_CENTRE_CT)
    assert np.linalg.norm(np.subtract(peak["lps_mm"], lesion_lps)) <= 6.0
    image = nib.load(entry["psam3d"]["nifti"])
    reference = nib.load(study.meta("S1")["ct_path"])
    assert image.shape == reference.shape
    np.testing.assert_allclose(image.affine, reference.affine)
    assert float(np.asarray(image.dataobj).max()) == pytest.approx(1.0, abs=0.05)
    assert (tmp_path / "S1" / "summary.json").is_file()


def test_explain_study_without_a_3d_maximum(study, tmp_path, monkeypatch):
    import re

    import sapsam_jax.explain._study as explain_module
    from sapsam_jax.explain._cli import _describe

    slices = {}
    draw = explain_module.save_fig3

    def record_slice(path, **kwargs):
        slices[kwargs["axis"]] = int(re.search(r"slice (\d+)", kwargs["title"]).group(1))
        return draw(path, **kwargs)

    monkeypatch.setattr(explain_module, "save_fig3", record_slice)
    runs = _runs(study)
    runs[2].model = Brightness(-1.0)  # sagittal: all-zero maps, so the 3-D PSAM is zero
    summary = explain_study(runs, "S1", tmp_path, subregions=["left_middle"])
    psam3d = summary["labels"]["fungus_ball"]["left_middle"]["psam3d"]
    assert psam3d["maximum"] is None and "all-zero map on the sagittal axis" in psam3d["reason"]
    assert not list((tmp_path / "S1").glob("*psam3d*"))  # no blank map with a fake peak
    saved = json.loads((tmp_path / "S1" / "summary.json").read_text())
    assert saved["labels"]["fungus_ball"]["left_middle"]["psam3d"]["maximum"] is None
    # Each figure through its own map: the coronal one through the lesion's rows, the axial one
    # (no depth) and the all-zero sagittal one through the middle of the sub-region (CT 12-23).
    assert abs(slices["coronal"] - LESION_CENTRE_CT[0]) <= 1.5
    assert abs(slices["axial"] - 17.5) <= 0.5 and abs(slices["sagittal"] - 17.5) <= 0.5
    assert _describe(summary) == "fungus_ball/left_middle no 3-D maximum"


def test_explain_refuses_a_ct_that_is_not_the_cached_one(tmp_path):
    from sapsam_jax.data._cache import CacheError
    from sapsam_jax.io import save_nifti

    cache = _write_study(tmp_path)
    meta = cache.meta("S1")
    other = np.full((30, 48, 48), -800, np.int16)  # another series saved at the same path
    save_nifti(meta["ct_path"], other, _ct_volume(other))
    with pytest.raises(CacheError, match=r"study S1: the CT .*ct\.nii\.gz changed since"):
        explain_study(_runs(cache), "S1", tmp_path / "out")
    del meta["source_fingerprint"]  # a cache built before fingerprints: the shape tells
    with pytest.raises(CacheError, match=r"study S1: the CT .*ct\.nii\.gz has shape"):
        explain_study(_runs(cache, axes=("axial",)), "S1", tmp_path / "out")
    with pytest.raises(CacheError, match=r"study S1: the CT .*ct\.nii\.gz has shape"):
        localisation_scores(_runs(cache), "test")


def test_gradcam_cli_with_stand_in_runs(study, tmp_path, monkeypatch):
    import sapsam_jax.train
    from sapsam_jax.explain import main

    runs = dict(zip(AXES, _runs(study), strict=True))
    for axis in AXES:
        for name in ("config.json", "run.json", "split.json"):
            (tmp_path / "runs" / axis).mkdir(parents=True, exist_ok=True)
            (tmp_path / "runs" / axis / name).write_text("{}")
    monkeypatch.setattr(sapsam_jax.train, "load_trained", lambda w: runs[Path(w).name])
    out = tmp_path / "out"
    argv = [
        "--workdir",
        str(tmp_path / "runs"),
        "--all",
        "--out",
        str(out),
        "--subregions",
        "left_middle",
        "--localisation",
    ]
    assert main(argv) == 0
    assert (out / "S1" / "fungus_ball_left_middle_psam3d.nii.gz").is_file()
    assert json.loads((out / "localisation.json").read_text())["signs"]["fungus_ball"]["3d"]


def _stand_in_workdirs(tmp_path, runs, monkeypatch):
    """Workdir folders for stand-in runs; load_trained hands back the run of a folder."""
    import sapsam_jax.train

    by_path = {}
    for run in runs:
        folder = (tmp_path / run.workdir).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "run.json", "split.json"):
            (folder / name).write_text("{}")
        by_path[folder] = run
    monkeypatch.setattr(sapsam_jax.train, "load_trained", lambda w: by_path[Path(w)])


def test_gradcam_cli_splits_runs_that_cannot_share_a_figure(study, tmp_path, monkeypatch):
    from sapsam_jax.explain import main

    # Two seeds of the three axes: two runs per (sign, axis), each set gets its own folder.
    runs = _runs(study, root="runs/seed0") + _runs(study, root="runs/seed1", seed=1)
    _stand_in_workdirs(tmp_path, runs, monkeypatch)
    out = tmp_path / "out"
    common = ["--all", "--out", str(out), "--subregions", "left_middle"]
    assert main(["--workdir", str(tmp_path / "runs"), *common, "--localisation"]) == 0
    for name in ("seed0", "seed1"):
        assert (out / name / "S1" / "fungus_ball_left_middle_psam3d.nii.gz").is_file()
        # Strict JSON: undefined scores are null, not NaN.
        json.loads((out / name / "localisation.json").read_text(), parse_constant=_refuse)
    # The same run named twice (relative and absolute) is one run, not two sets.
    monkeypatch.chdir(tmp_path)
    twice = ["--workdir", "runs/seed0", str(tmp_path / "runs" / "seed0")]
    assert main([*twice, "--all", "--out", str(tmp_path / "o2")]) == 0
    assert (tmp_path / "o2" / "S1" / "summary.json").is_file()
    # Two seeds side by side in one folder: their sets share that folder, numbered apart.
    mixed = []
    for seed in (0, 1):
        for run in _runs(study, seed=seed, axes=("axial", "coronal")):
            run.workdir = f"flat/s{seed}-{run.config.axis}"  # all four in one folder
            mixed.append(run)
    _stand_in_workdirs(tmp_path, mixed, monkeypatch)
    assert main(["--workdir", str(tmp_path / "flat"), "--all", "--out", str(out / "m")]) == 0
    assert sorted(p.name for p in (out / "m").iterdir()) == ["runs-1", "runs-2"]


def _refuse(token):
    raise ValueError(f"{token} is not JSON")


def test_gradcam_cli_errors(study, tmp_path, monkeypatch, capsys):
    from sapsam_jax.explain import main

    _stand_in_workdirs(tmp_path, _runs(study, test=()), monkeypatch)
    workdir = ["--workdir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as stop:
        main([*workdir, "--study", "S1", "--subregions", "positive", "left_upper"])
    assert stop.value.code == 2 and "stands alone" in capsys.readouterr().err
    assert main([*workdir, "--study", "NOPE"]) == 2
    err = capsys.readouterr().err
    assert "study NOPE is not in the cache" in err and "; it holds 1 study: S1" in err
    assert main([*workdir, "--study", "P1", "NOPE"]) == 2  # a patient id for a study id
    err = capsys.readouterr().err
    assert "studies P1, NOPE are not in the cache" in err
    assert "(P1 is a patient; its studies are S1)" in err
    assert main([*workdir, "--all", "--localisation"]) == 2  # empty test split
    assert "hold no study" in capsys.readouterr().err
    assert main([*workdir, "--study", "S1", "--layer", "block9_conv9"]) == 2
    assert "has no layer 'block9_conv9'" in capsys.readouterr().err


def test_find_workdirs_names_every_file_a_workdir_needs(tmp_path):
    from sapsam_jax.explain import find_workdirs

    for name in ("config.json", "run.json"):  # no split.json: not a workdir
        (tmp_path / "run" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "run" / name).write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"\(config\.json \+ run\.json \+ split\.json\)"):
        find_workdirs([tmp_path])


def test_explain_study_uses_each_runs_map_settings(study, tmp_path):
    runs = _runs(study)
    runs[1].config.cam_method = "hirescam"  # coronal
    summary = explain_study(runs, "S1", tmp_path, subregions=["left_middle"])
    maps = summary["labels"]["fungus_ball"]["left_middle"]["maps"]
    assert maps["coronal"]["method"] == "hirescam" and maps["axial"]["method"] == "gradcam"
    assert summary["method"] is None  # nothing asked: each run's own


def test_maps_undo_the_rotations_of_the_runs_cache(study):
    from sapsam_jax.explain import view_maps

    wider = GeometryConfig(grid_shape=(24, 32, 32), rotation_angles_deg=(-10.0, 0.0, 10.0))
    cache = FakeCache(study._meta, study._bands, study._lesions, geometry=wider)
    run = _runs(cache, axes=("axial",))[0]
    assert view_maps(run, "S1", "fungus_ball").angles == (0.0, 0.0, 0.0)  # its identity
    assert view_maps(run, "S1", "fungus_ball", rotation=26).angles == (10.0, 10.0, 10.0)
    with pytest.raises(ValueError, match="index must be an integer 0-26"):
        view_maps(run, "S1", "fungus_ball", rotation=27)


def test_pointing_game_energy_and_distance(rng):
    mask = np.zeros((20, 20), bool)
    mask[5:8, 5:8] = True
    cam = np.zeros((20, 20))
    cam[10, 6] = 1.0  # two pixels below the lesion
    assert not pointing_game(cam, mask, tolerance_px=1)
    assert pointing_game(cam, mask, tolerance_px=3)
    assert not pointing_game(np.zeros((20, 20)), mask)
    cam[6, 6] = 3.0
    assert energy_inside(cam, mask) == pytest.approx(0.75)
    lesion = rng.random((12, 14, 10)) > 0.97
    spacing = (2.5, 0.7, 0.9)
    edt = ndi.distance_transform_edt(~lesion, sampling=spacing)
    for point in [(0, 0, 0), (6, 7, 3), (11, 13, 9)]:
        assert distance_to_lesion_mm(point, lesion, spacing) == pytest.approx(edt[point])
    assert distance_to_lesion_mm((1, 1, 1), np.zeros((3, 3, 3), bool), spacing) == np.inf


def test_a_flat_map_points_nowhere():
    # InceptionV3's mixed10 is 1x1 at its 75x75 minimum input, so every upsampled map is one
    # value everywhere: it has no maximum, and its arg-max is the image corner, lesion or not.
    mask = np.zeros((20, 20), bool)
    mask[0:3, 0:3] = True  # a lesion in the corner that the arg-max picks
    assert not pointing_game(np.full((20, 20), 0.2, np.float32), mask)


def test_the_pointing_game_takes_the_peak_plateau_centre_not_its_corner():
    import jax

    from sapsam_jax.explain._psam import plateau_peak

    # A 4x2 map enlarged 16x bilinearly (as grad_cam does): a peak in a corner cell is flat from
    # that cell's centre (7.5, 7.5) to the border, and its first arg-max is the corner (0, 0).
    cam = np.zeros((4, 2), np.float32)
    cam[0, 0], cam[1, 0], cam[0, 1] = 1.0, 0.5, 0.3
    big = np.asarray(jax.image.resize(cam, (64, 32), "bilinear"))
    np.testing.assert_allclose(plateau_peak(big)[1], [3.5, 3.5])  # the plateau's centre
    lesion = np.zeros((64, 32), bool)
    lesion[4:12, 4:12] = True  # under the corner cell, 5.7 px from (0, 0)
    assert pointing_game(big, lesion)
    # An inner peak is a point: the cell centre, 16 * 1 + 7.5 = 23.5 on both axes.
    cam = np.zeros((4, 4), np.float32)
    cam[1, 1] = 1.0
    big = np.asarray(jax.image.resize(cam, (64, 64), "bilinear"))
    np.testing.assert_allclose(plateau_peak(big)[1], [23.5, 23.5], atol=0.01)


def test_a_flat_map_cuts_its_figure_through_the_subregion_middle(mapping):
    from sapsam_jax.explain._study import _slice_through_maximum

    # Like an all-zero map, through the sub-region's middle: left_middle is working k 8-15, whose
    # middle 11.5 is CT k 4 - 0.5 + (11.5 + 0.5) * 1.25 = 18.5 (not its bottom row, CT k 14).
    flat = np.full(subregion_image_shape(WORKING, "coronal"), 0.2, np.float32)
    k = _slice_through_maximum(flat, "coronal", "left_middle", mapping, None, None)
    assert abs(k - 18.5) <= 0.5


def test_choose_subregions():
    from sapsam_jax.explain._study import ViewMaps, choose_subregions

    def view(probs):
        n = len(probs)
        return ViewMaps(
            "S",
            "cavity",
            "axial",
            13,
            SUBREGIONS,
            np.zeros((n, 2, 2, 3)),
            np.zeros((n, 2, 2)),
            np.asarray(probs),
        )

    views = {
        "axial": view([0.1, 0.7, 0.2, 0.1, 0.1, 0.1]),
        "coronal": view([0.1, 0.2, 0.2, 0.6, 0.1, 0.1]),
    }
    assert choose_subregions(views, "positive") == [1, 3]
    assert choose_subregions({"axial": view([0.1, 0.2, 0.3, 0.1, 0.1, 0.1])}) == [2]
    assert choose_subregions(views, "all") == list(range(6))
    assert choose_subregions(views, ["right_lower"]) == [5]


def test_disease_runs_given_sign_multi_share_one_set():
    # --sign multi means nothing to the disease task: its three axes belong in one set (one
    # 3-D PSAM), whatever --sign each run was started with.
    from types import SimpleNamespace

    from sapsam_jax.explain._study import run_sets
    from sapsam_jax.train import TINY

    runs = [
        SimpleNamespace(
            config=TINY.replace(task="disease", axis=axis, sign=sign),
            workdir=axis,
            multi_label=False,  # run.json: a disease network has one softmax output pair
        )
        for axis, sign in (("axial", "multi"), ("coronal", "all"), ("sagittal", "cavity"))
    ]
    assert [len(members) for members in run_sets(runs)] == [3]


def test_the_figure_slice_goes_through_the_peak_plateau_centre(mapping):
    from sapsam_jax.explain._study import _slice_through_maximum

    # A coronal map of left_middle (working k 8-15) whose maximum is a plateau over its rows 0-3:
    # its centre, row 1.5, is working k 9.5, CT k 4 - 0.5 + (9.5 + 0.5) * 1.25 = 16 (the first
    # arg-max, row 0, gave CT k 14).
    plateau = np.full(subregion_image_shape(WORKING, "coronal"), 0.1, np.float32)
    plateau[0:4, 0:2] = 1.0
    assert _slice_through_maximum(plateau, "coronal", "left_middle", mapping, None, None) == 16


def test_gradcam_cli_refuses_a_threshold_outside_0_1(capsys):
    from sapsam_jax.explain._cli import main

    for bad in ("1.5", "-0.1", "abc", "nan"):
        with pytest.raises(SystemExit) as stop:
            main(["--workdir", "runs", "--all", "--threshold", bad])
        assert stop.value.code == 2
        assert f"a probability in 0-1, not {bad}" in capsys.readouterr().err


def test_gradcam_cli_localisation_without_lesion_truth_says_so(
    study, tmp_path, monkeypatch, capsys
):
    # A real cohort has no lesion_labels: --localisation used to write an empty
    # localisation.json and print its path as if scores were there.
    from sapsam_jax.explain import main

    meta = {**study.meta("S1"), "lesion_labels_path": None}
    cache = FakeCache(meta, study._bands, dict.fromkeys(AXES))
    _stand_in_workdirs(tmp_path, _runs(cache, axes=("axial",)), monkeypatch)
    out = tmp_path / "out"
    argv = ["--workdir", str(tmp_path / "runs"), "--all", "--out", str(out), "--localisation"]
    assert main(argv) == 0
    assert json.loads((out / "localisation.json").read_text())["records"] == []
    err = capsys.readouterr().err
    assert "warning: no localisation scores" in err and "lesion_labels" in err
