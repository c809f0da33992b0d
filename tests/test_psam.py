"""PSAM back-projection to the working grid and the CT, 3-D PSAMs, localisation scores."""

import numpy as np
import pytest

from sapsam_jax.config import AXES, GeometryConfig
from sapsam_jax.explain import (
    backproject,
    locate_maximum,
    psam_3d,
    psam_to_ct,
    working_volume_to_ct,
)
from sapsam_jax.preprocess import (
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


def test_psam_to_ct_composes(mapping, rng):
    map2d = rng.random((8, 8)).astype(np.float32)
    direct = psam_to_ct(map2d, axis="coronal", subregion="right_lower", mapping=mapping)
    volume = backproject(map2d, "coronal", "right_lower", WORKING)
    np.testing.assert_array_equal(direct, working_volume_to_ct(volume, mapping))
    for k in (0, 7, 20, 39):  # one axial CT slice alone matches the volume's slice
        np.testing.assert_array_equal(working_volume_to_ct(volume, mapping, ct_k=k), direct[k])


def _projections(volume, subregion, rotation=None):
    region = subregion_slices(WORKING)[subregion]
    if rotation is not None:
        volume = _rotate(volume, rotation)
    return {axis: volume[region].mean(axis=a) for axis, a in AXES.items()}


@pytest.mark.parametrize("rotation", [None, 5])
def test_psam_3d_finds_a_lesion_in_depth(mapping, rotation):
    centre = np.array([11.0, 6.0, 12.0])  # inside left_middle: k 8..15, i 8..15
    maps = _projections(_blob(WORKING, centre), "left_middle", rotation)
    volume = psam_3d(maps, "left_middle", WORKING)
    affine = np.diag([*SPACING, 1.0])
    peak = locate_maximum(volume, mapping, affine, rotation=rotation)
    expected_ct = working_to_ct(centre, mapping)
    assert np.linalg.norm(np.subtract(peak["ct_index"], expected_ct)) <= 2.5
    assert peak["subregion"] == "left_middle"
    np.testing.assert_allclose(peak["lps_mm"], np.multiply(peak["ct_index"], SPACING))
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
