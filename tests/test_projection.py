"""Projections (paper 2.2-2.3): brute-force references, band edges, fused kernels and twins."""

import ctypes
import shutil
import subprocess
import warnings

import numpy as np
import pytest
import scipy.ndimage as ndi_ref

from sapsam_jax.config import AXES, PAPER, PAPER_BANDS, SUBREGIONS, GeometryConfig
from sapsam_jax.preprocess import _gpu_kernels as gk
from sapsam_jax.preprocess import (
    average_projection,
    band_projection,
    rotate_project,
    subregion_band_projections,
    subregion_slices,
)
from sapsam_jax.preprocess._kernels import kernel_source

WINDOW = (-1000.0, 0.0)


def _random_case(rng, shape, p_mask=0.6):
    hu = rng.uniform(-1500.0, 400.0, size=shape).astype(np.float32)
    mask = rng.random(shape) < p_mask
    return hu, mask


def _brute_mean(hu, inside, axis):
    """np.nanmean over a NaN-masked copy; NaN (empty ray) -> None."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mean of an empty ray
        return np.nanmean(np.where(inside, hu.astype(np.float64), np.nan), axis=axis)


def _brute_average(hu, mask, axis, window):
    mean = _brute_mean(hu, mask, axis)
    lo, hi = window
    return np.where(np.isnan(mean), 0.0, np.clip((mean - lo) / (hi - lo), 0, 1))


def _brute_bands(hu, mask, axis, bands):
    """Loop over every ray and every voxel: membership spelled out, [lo, hi) and last [lo, hi]."""
    h = np.moveaxis(hu, axis, -1)
    m = np.moveaxis(mask, axis, -1)
    out = np.zeros(h.shape[:-1] + (len(bands),))
    for idx in np.ndindex(h.shape[:-1]):
        for b, (lo, hi) in enumerate(bands):
            last = b == len(bands) - 1
            vals = [
                float(v)
                for v, inside in zip(h[idx], m[idx], strict=True)
                if inside and lo <= v and (v <= hi if last else v < hi)
            ]
            if vals:
                out[idx + (b,)] = (sum(vals) / len(vals) - lo) / (hi - lo)
    return out


GRIDS = [((13, 11), 0), ((13, 11), 1), ((9, 8, 7), 0), ((9, 8, 7), 1), ((9, 8, 7), 2)]


@pytest.mark.parametrize(("shape", "axis"), GRIDS)
def test_average_projection_matches_brute_force(rng, shape, axis):
    hu, mask = _random_case(rng, shape)
    mask[(0,) * (len(shape) - 1)] = False  # one empty ray
    got = average_projection(hu, mask, axis, WINDOW)
    assert got.dtype == np.float32 and got.shape == tuple(np.delete(shape, axis))
    np.testing.assert_allclose(got, _brute_average(hu, mask, axis, WINDOW), atol=1e-5)


@pytest.mark.parametrize(("shape", "axis"), GRIDS)
@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_band_projection_matches_brute_force(rng, shape, axis, dtype):
    hu, mask = _random_case(rng, shape)
    hu = hu.astype(dtype)
    got = band_projection(hu, mask, axis, PAPER_BANDS)
    assert got.dtype == np.float32 and got.shape == tuple(np.delete(shape, axis)) + (3,)
    np.testing.assert_allclose(got, _brute_bands(hu, mask, axis, PAPER_BANDS), atol=1e-5)


def test_axis_names_are_array_axes(rng):
    hu, mask = _random_case(rng, (6, 5, 4))
    for name, a in AXES.items():
        np.testing.assert_array_equal(band_projection(hu, mask, name), band_projection(hu, mask, a))
        expected = average_projection(hu, mask, a)
        np.testing.assert_array_equal(average_projection(hu, mask, name), expected)
    with pytest.raises(ValueError, match="unknown axis"):
        average_projection(hu, mask, "oblique")


def test_band_edges_are_half_open_except_the_last():
    # One voxel per ray, so each output is that voxel's band value (or 0 when it is in none).
    edges = np.array([-1400.01, -1400.0, -900.0, -160.0, 240.0, 240.01], dtype=np.float32)
    got = band_projection(edges[:, None], np.ones((6, 1), bool), axis=1)
    expected = np.array(
        [
            [0, 0, 0],  # below the air band: in none
            [0, 0, 0],  # -1400 opens band 0 at its bottom: (v - lo) / (hi - lo) = 0
            [0, 0, 0],  # -900 is band 1's bottom, not band 0's top
            [0, 0, 0],  # -160 is band 2's bottom
            [0, 0, 1],  # 240 closes the last band
            [0, 0, 0],  # above 240: in none
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(got, expected)
    # Which band a voxel counts in, seen through the mean of a ray with a second voxel.
    ray = np.array([[-900.0, -1000.0], [-160.0, -500.0], [240.0, 0.0]], dtype=np.float32)
    got = band_projection(ray, np.ones_like(ray, bool), axis=1)
    np.testing.assert_allclose(got[0], [0.8, 0.0, 0.0], atol=1e-6)  # -1000 only in band 0
    np.testing.assert_allclose(got[1], [0, (-500 + 900) / 740, 0], atol=1e-6)  # -160 in band 2
    np.testing.assert_allclose(got[2], [0, 0, (120 + 160) / 400], atol=1e-6)
    # Each band's bottom edge counts in it: paired with an inner voxel it pulls the mean down
    # (alone it would map to 0, the same as not counting at all).
    ray = np.array([[-1400.0, -1000.0], [-900.0, -500.0], [-160.0, 0.0]], dtype=np.float32)
    got = band_projection(ray, np.ones_like(ray, bool), axis=1)
    np.testing.assert_allclose(got[0], [(-1200 + 1400) / 500, 0, 0], atol=1e-6)  # not 0.8
    np.testing.assert_allclose(got[1], [0, (-700 + 900) / 740, 0], atol=1e-6)
    np.testing.assert_allclose(got[2], [0, 0, (-80 + 160) / 400], atol=1e-6)


def test_empty_rays_give_zero(rng):
    hu, _ = _random_case(rng, (8, 6, 5))
    mask = np.zeros(hu.shape, bool)
    assert not average_projection(hu, mask, 0).any()
    assert not band_projection(hu, mask, 2).any()
    # A ray whose in-mask voxels all sit in the soft-tissue band leaves the other two at 0.
    hu[:, 0, 0], mask[:, 0, 0] = 100.0, True
    np.testing.assert_allclose(band_projection(hu, mask, 0)[0, 0], [0, 0, 0.65], atol=1e-6)


def test_a_non_boolean_mask_counts_its_nonzero_voxels(rng):
    # A label map used as a mask (2 = a lung label, 255 = a saved 8-bit mask) selects its
    # non-zero voxels, as the GPU kernel (which casts to bool) does; bitwise `&` with the band
    # test dropped value 2 and the mean divided by the sum of the mask values.
    hu, mask = _random_case(rng, (9, 8, 7))
    for value in (2, 255):
        labels = mask.astype(np.uint8) * value
        for axis in range(3):
            np.testing.assert_array_equal(
                average_projection(hu, labels, axis), average_projection(hu, mask, axis)
            )
            np.testing.assert_array_equal(
                band_projection(hu, labels, axis), band_projection(hu, mask, axis)
            )
            np.testing.assert_array_equal(
                subregion_band_projections(hu, labels, axis),
                subregion_band_projections(hu, mask, axis),
            )


def _smooth_case(rng, shape):
    """Lung-like HU with soft-tissue structure and blob masks: smooth enough to interpolate."""
    hu = ndi_ref.gaussian_filter(rng.normal(size=shape), 1.5)
    hu = (-700.0 + 2500.0 * hu).astype(np.float32)
    # Voxels exactly on the band edges, so the kernels' edge rules ([lo, hi), last closed) count.
    edges = np.array([-1400.0, -900.0, -160.0, 240.0], np.float32)
    spots = rng.choice(hu.size, size=4 * max(1, hu.size // 200), replace=False)
    hu.flat[spots] = np.resize(edges, spots.size)
    blobs = ndi_ref.gaussian_filter(rng.normal(size=shape), 2.0)
    refined = blobs > np.quantile(blobs, 0.4)
    conservative = refined & (hu < -300)
    return hu, conservative, refined


def _brute_subregions(hu, mask, axis):
    slices = subregion_slices(hu.shape)
    a = AXES[axis]
    return np.stack([_brute_bands(hu[sl], mask[sl], a, PAPER_BANDS) for sl in slices.values()])


@pytest.mark.parametrize("axis", list(AXES))
def test_subregion_band_projections_match_brute_force(rng, axis):
    hu, _, mask = _smooth_case(rng, (9, 5, 6))
    got = subregion_band_projections(hu, mask, axis)
    np.testing.assert_allclose(got, _brute_subregions(hu, mask, axis), atol=1e-5)


# Twin vs unfused and host-emulated kernel vs twin: every pixel within TWIN_ATOL (measured
# <= 1.5e-6 over all 27 rotations). The twin samples at float32 coordinates, affine_transform at
# float64 ones, so a mask value within ~1e-5 of 0.5 or an HU on a band edge could in principle
# count on one side only; on the GPU (other float rounding, FMA contraction) we therefore allow
# up to 0.5 % of pixels past TWIN_ATOL.
TWIN_ATOL, GPU_MAX_MISMATCH = 1e-5, 0.005
SOME_ROTATIONS = [(0.0, 0.0, 0.0), (5.0, 0.0, 0.0), (0.0, -5.0, 0.0), (0.0, 0.0, 5.0), (-5, 5, 5)]


def _assert_close_mostly(got, expected, atol=TWIN_ATOL, max_fraction=GPU_MAX_MISMATCH):
    bad = np.abs(np.asarray(got) - np.asarray(expected)) > atol
    assert bad.mean() <= max_fraction, f"{bad.sum()} of {bad.size} differ by more than {atol}"


def test_fused_twin_equals_unfused_path(rng):
    hu, cons, ref = _smooth_case(rng, (24, 20, 22))
    rotations = GeometryConfig().rotations()
    twin = rotate_project(hu, cons, ref, rotations, method="twin")
    unfused = rotate_project(hu, cons, ref, rotations, method="unfused")
    for part_twin, part_unfused in zip(twin, unfused, strict=True):
        for axis in AXES:
            assert part_twin[axis].shape == part_unfused[axis].shape
            np.testing.assert_allclose(part_twin[axis], part_unfused[axis], atol=TWIN_ATOL)
    # Rotated images really differ from the identity (index 13), so the check has teeth.
    assert np.abs(twin[1]["axial"][0] - twin[1]["axial"][13]).max() > 0.05


def test_rotate_project_shapes_and_identity(rng):
    hu, cons, ref = _smooth_case(rng, (12, 10, 8))
    gray, bands = rotate_project(hu, cons, ref, [(0, 0, 0), (5, 5, 5)], method="unfused")
    assert gray["axial"].shape == (2, 10, 8) and gray["sagittal"].shape == (2, 12, 10)
    assert bands["axial"].shape == (2, 6, 10, 4, 3) and bands["coronal"].shape == (2, 6, 4, 4, 3)
    np.testing.assert_array_equal(gray["coronal"][0], average_projection(hu, cons, 1))
    np.testing.assert_array_equal(bands["sagittal"][0], subregion_band_projections(hu, ref, 2))
    with pytest.raises(ValueError, match="needs CuPy"):
        rotate_project(hu, cons, ref, [(0, 0, 0)], method="fused")


# --- CUDA kernels ------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_kernels_compile_with_nvcc(tmp_path):
    """The exact preamble + source CuPy would compile: every axis, both HU dtypes."""
    for axis, dtype in zip(range(3), ("float32", "int16", "float32"), strict=True):
        defines = gk.kernel_defines(axis, (54, 64, 64), dtype)
        src = tmp_path / f"project_{axis}_{dtype}.cu"
        src.write_text(kernel_source(gk.KERNEL_FILE, defines))
        ptx = src.with_suffix(".ptx")
        cmd = ["nvcc", "--ptx", "-arch=sm_90", "--std=c++14", "-o", str(ptx), str(src)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        for base in (gk.PROJECT_BANDS, gk.ROTATE_PROJECT):
            assert f".entry {gk.kernel_name(base, defines)}(" in ptx.read_text()


# Host emulation: the same source built by g++ with CUDA's qualifiers defined away and the grid
# walked in a loop. It checks the kernels' logic (indexing, sub-region splits, bands, sampling)
# against the NumPy twins on machines without a GPU; the gpu-marked tests below check the real
# thing where there is one.
_HOST_SHIM = """
#include <algorithm>
#include <cmath>
using std::min;
struct Dim3 { int x, y, z; };
static Dim3 blockIdx, threadIdx, blockDim;
#define __device__
#define __global__
#define __forceinline__ inline
#define __restrict__
"""
_HOST_LAUNCH = """
#define GRID_LOOP(call) \\
    blockDim.x = threads; \\
    for (int y = 0; y < gy; ++y) for (int x = 0; x < gx; ++x) for (int t = 0; t < threads; ++t) { \\
        blockIdx.x = x; blockIdx.y = y; threadIdx.x = t; call; }
extern "C" void launch_project(int gx, int gy, int threads, const HU_T* hu,
                               const unsigned char* mask, float* bands) {
    GRID_LOOP(SAPSAM_NAME(sapsam_project_bands_3d)(hu, mask, bands))
}
extern "C" void launch_rotate(int gx, int gy, int threads, const HU_T* hu,
                              const unsigned char* masks, const float* affines, float* gray,
                              float* bands, float lo, float hi) {
    GRID_LOOP(SAPSAM_NAME(sapsam_rotate_project_bands_3d)(hu, masks, affines, gray, bands, lo, hi))
}
"""
_host_compiler = shutil.which("g++")


def _host_kernels(tmp_path, defines):
    src = tmp_path / f"project_{dict(defines)['AXIS']}.cpp"
    src.write_text(_HOST_SHIM + kernel_source(gk.KERNEL_FILE, defines) + _HOST_LAUNCH)
    lib = src.with_suffix(".so")
    cmd = [_host_compiler, "-O1", "-shared", "-fPIC", "-w", "-o", str(lib), str(src)]
    subprocess.run(cmd, check=True, capture_output=True)
    return ctypes.CDLL(str(lib))


def _ptr(array):
    return array.ctypes.data_as(ctypes.c_void_p)


@pytest.mark.skipif(_host_compiler is None, reason="g++ not found")
@pytest.mark.parametrize("axis", list(AXES))
# The second shape is not divisible into sub-regions (k by 3, i by 2): the remainder rays.
@pytest.mark.parametrize("shape", [(15, 10, 12), (17, 9, 13)])
def test_host_emulated_kernels_match_twins(tmp_path, rng, axis, shape):
    hu, cons, ref = _smooth_case(rng, shape)
    a = AXES[axis]
    # Kernel 1 on the unrotated volume vs the NumPy path.
    defines = gk.kernel_defines(a, shape, "float32")
    lib = _host_kernels(tmp_path, defines)
    out = np.zeros((6, *subregion_band_projections(hu, ref, axis).shape[1:]), np.float32)
    gx, gy = gk._grid(a, shape, 1)
    lib.launch_project(gx, gy, gk._THREADS, _ptr(hu), _ptr(ref.astype(np.uint8)), _ptr(out))
    np.testing.assert_allclose(out, subregion_band_projections(hu, ref, axis), atol=1e-5)
    # Kernel 2 (rotation fused) vs the twin: the same sampling, float32 on both sides.
    twin_gray, twin_bands = rotate_project(
        hu, cons, ref, SOME_ROTATIONS, axes=(axis,), method="twin"
    )
    gray, bands = np.zeros_like(twin_gray[axis]), np.zeros_like(twin_bands[axis])
    packed = cons.astype(np.uint8) | (ref.astype(np.uint8) << 1)
    affines = gk.rotation_affines(SOME_ROTATIONS, shape)
    gx, gy = gk._grid(a, shape, len(SOME_ROTATIONS))
    lo, hi = (ctypes.c_float(v) for v in PAPER.projection.gray_window_hu)
    arrays = (hu, packed, affines, gray, bands)
    lib.launch_rotate(gx, gy, gk._THREADS, *(_ptr(v) for v in arrays), lo, hi)
    np.testing.assert_allclose(gray, twin_gray[axis], atol=TWIN_ATOL)  # measured <= 4e-7
    np.testing.assert_allclose(bands, twin_bands[axis], atol=TWIN_ATOL)  # measured <= 8e-7


@pytest.mark.gpu
@pytest.mark.parametrize("axis", list(AXES))
@pytest.mark.parametrize("dtype", [np.float32, np.int16])
@pytest.mark.parametrize("shape", [(27, 32, 30), (28, 33, 31)])
def test_gpu_project_bands_kernel_matches_numpy(rng, axis, dtype, shape):
    import cupy

    hu, _, ref = _smooth_case(rng, shape)
    hu = hu.astype(dtype)
    got = subregion_band_projections(cupy.asarray(hu), cupy.asarray(ref), axis)
    assert isinstance(got, cupy.ndarray)
    np.testing.assert_allclose(got.get(), subregion_band_projections(hu, ref, axis), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(27, 32, 30), (28, 33, 31)])
def test_gpu_fused_kernel_matches_twin_and_unfused(rng, shape):
    import cupy

    hu, cons, ref = _smooth_case(rng, shape)
    rotations = GeometryConfig().rotations()
    fused = rotate_project(*(cupy.asarray(v) for v in (hu, cons, ref)), rotations, method="fused")
    twin = rotate_project(hu, cons, ref, rotations, method="twin")
    unfused = rotate_project(
        *(cupy.asarray(v) for v in (hu, cons, ref)), rotations, method="unfused"
    )
    for f, t, u in zip(fused, twin, unfused, strict=True):
        for axis in AXES:
            assert isinstance(f[axis], cupy.ndarray)
            _assert_close_mostly(f[axis].get(), t[axis])
            _assert_close_mostly(f[axis].get(), u[axis].get())


def test_subregion_names_follow_config():
    assert tuple(subregion_slices((6, 4, 4))) == SUBREGIONS
