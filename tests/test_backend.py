"""Backend selection and the CuPy -> JAX hand-off (issue 2, "One source, two backends")."""

import os

import numpy as np
import pytest
import scipy.ndimage
import skimage.morphology

from sapsam_jax import backend as bk


def test_cpu_backend_namespaces():
    cpu = bk.get_backend("cpu")
    assert cpu.name == "cpu" and not cpu.is_gpu
    assert cpu.xp is np and cpu.ndi is scipy.ndimage
    assert cpu.ski.morphology is skimage.morphology
    # The namespaces really compute: a 3x3 dilation of one voxel through bk.ndi.
    img = np.zeros((5, 5), bool)
    img[2, 2] = True
    assert cpu.ndi.binary_dilation(img).sum() == 5


def test_environment_variable_chooses_the_backend(monkeypatch):
    monkeypatch.setenv(bk.BACKEND_ENV_VAR, "cpu")
    assert bk.get_backend().name == "cpu"
    monkeypatch.setenv(bk.BACKEND_ENV_VAR, "tpu")
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        bk.get_backend()


def test_auto_follows_the_device(monkeypatch):
    expected = "gpu" if bk.gpu_available() else "cpu"
    assert bk.get_backend("auto").name == expected


@pytest.mark.skipif(bk.gpu_available(), reason="this machine has a GPU")
def test_asking_for_a_gpu_without_one_is_an_error():
    with pytest.raises(bk.BackendError, match="no CUDA device"):
        bk.get_backend("gpu")


def test_numpy_arrays_stay_on_the_cpu_and_reach_jax():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert bk.backend_of(a).name == "cpu"
    assert bk.to_numpy(a) is a
    j = bk.to_jax(a[:, ::2])  # a strided view too
    np.testing.assert_array_equal(np.asarray(j), a[:, ::2])


def _in_a_jax_with_the_gpu(code: str) -> None:
    """Run ``code`` in a fresh interpreter whose JAX may start CUDA: this session's JAX is
    pinned to the CPU (conftest), and a CUDA array cannot reach it through DLPack."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.gpu
def test_cupy_to_jax_hand_off_does_not_copy():
    _in_a_jax_with_the_gpu(
        """
import cupy as cp, numpy as np
from sapsam_jax import backend as bk
x = cp.arange(4 * 5, dtype=cp.float32).reshape(4, 5)
j = bk.to_jax(x)
assert j.unsafe_buffer_pointer() == x.data.ptr, "copied"  # the same device buffer
np.testing.assert_array_equal(np.asarray(j), x.get())
assert bk.backend_of(x).is_gpu
"""
    )


@pytest.mark.gpu
def test_non_contiguous_cupy_array_is_made_contiguous_on_the_device():
    _in_a_jax_with_the_gpu(
        """
import cupy as cp, numpy as np
from sapsam_jax import backend as bk
x = cp.arange(6 * 8, dtype=cp.float32).reshape(6, 8)[:, 1::2]
np.testing.assert_array_equal(np.asarray(bk.to_jax(x)), x.get())
"""
    )


def test_missing_cucim_fails_only_where_it_is_used():
    stand_in = bk._Unavailable("bk.ski on the GPU needs cuCIM")
    with pytest.raises(bk.BackendError, match="needs cuCIM"):
        stand_in.segmentation.watershed  # noqa: B018 - the attribute access is the test
