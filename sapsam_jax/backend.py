"""One source, two backends: NumPy/SciPy/scikit-image on the CPU, CuPy/cupyx/cuCIM on the GPU.

Pipeline code is written against a small namespace -- ``bk.xp`` (numpy or cupy), ``bk.ndi``
(scipy.ndimage or cupyx.scipy.ndimage) and ``bk.ski`` (scikit-image or cuCIM's mirror of it) -- so
the same function runs on both without ``if gpu:`` branches. Real divergences are tagged
``# CuPy Backend:`` where they occur.

Choose with :func:`get_backend` (``"auto"``, ``"cpu"``, ``"gpu"``; default from the environment
variable ``SAPSAM_BACKEND``) or follow an array with :func:`backend_of`.
"""

from __future__ import annotations

import functools
import importlib
import os
import types
from dataclasses import dataclass
from typing import Any

import numpy as np

BACKEND_ENV_VAR = "SAPSAM_BACKEND"
BACKEND_NAMES = ("auto", "cpu", "gpu")
# scikit-image submodules the pipeline uses; cuCIM mirrors each under cucim.skimage.
_SKIMAGE_SUBMODULES = ("morphology", "measure", "filters", "segmentation", "transform", "feature")


class BackendError(RuntimeError):
    """The requested backend cannot be used on this machine."""


@dataclass(frozen=True)
class Backend:
    """Array, ndimage and scikit-image namespaces of one backend."""

    name: str  # "cpu" or "gpu"
    xp: Any  # numpy or cupy
    ndi: Any  # scipy.ndimage or cupyx.scipy.ndimage
    ski: Any  # namespace with scikit-image (or cuCIM) submodules as attributes

    @property
    def is_gpu(self) -> bool:
        return self.name == "gpu"

    def asarray(self, array, dtype=None):
        """Move ``array`` onto this backend (a host->device copy on the GPU, else no copy)."""
        return self.xp.asarray(array, dtype=dtype)

    def to_numpy(self, array) -> np.ndarray:
        """Bring ``array`` back to host memory as a NumPy array."""
        return to_numpy(array)


def _skimage_namespace(package: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        **{name: importlib.import_module(f"{package}.{name}") for name in _SKIMAGE_SUBMODULES}
    )


@functools.cache
def _cpu_backend() -> Backend:
    import scipy.ndimage

    return Backend("cpu", np, scipy.ndimage, _skimage_namespace("skimage"))


@functools.cache
def gpu_available() -> bool:
    """True when CuPy is importable and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, or CUDA driver/runtime errors on machines without a GPU
        return False


@functools.cache
def _gpu_backend() -> Backend:
    if not gpu_available():
        raise BackendError(
            "backend 'gpu' was requested but no CUDA device is visible to CuPy "
            "(install the 'gpu' extra on a machine with an NVIDIA GPU, or use backend='cpu')"
        )
    import cupy
    import cupyx.scipy.ndimage

    try:
        ski = _skimage_namespace("cucim.skimage")
    except ImportError as err:
        # The GPU pipeline runs on CuPy, cupyx.scipy.ndimage and our kernels alone today (cuCIM
        # has no watershed), so a missing cuCIM only matters to code that asks for bk.ski.
        ski = _Unavailable(
            "bk.ski on the GPU needs cuCIM: pip install cucim-cu12 (or cucim-cu13 for CUDA 13); "
            f"import failed with: {err}"
        )
    return Backend("gpu", cupy, cupyx.scipy.ndimage, ski)


class _Unavailable:
    """Stands in for a namespace that could not be imported; any use says why."""

    def __init__(self, reason: str):
        self._reason = reason

    def __getattr__(self, name):
        raise BackendError(self._reason)


def get_backend(name: str | Backend | None = None) -> Backend:
    """Return the backend called ``name`` ("auto", "cpu", "gpu"); None reads ``$SAPSAM_BACKEND``.

    ``auto`` takes the GPU when CuPy sees a device. Asking for ``gpu`` where there is none raises
    :class:`BackendError` rather than falling back silently.
    """
    if isinstance(name, Backend):
        return name
    if name is None:
        name = os.environ.get(BACKEND_ENV_VAR, "auto")
    name = name.strip().lower()
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKEND_NAMES)}")
    if name == "auto":
        name = "gpu" if gpu_available() else "cpu"
    return _gpu_backend() if name == "gpu" else _cpu_backend()


def is_cupy_array(array) -> bool:
    """True for a CuPy ndarray (checked without importing CuPy)."""
    return type(array).__module__.split(".")[0] == "cupy"


def backend_of(array) -> Backend:
    """The backend that owns ``array``: GPU for CuPy arrays, CPU for anything else."""
    return _gpu_backend() if is_cupy_array(array) else _cpu_backend()


def to_numpy(array) -> np.ndarray:
    """Host copy of a NumPy/CuPy/JAX array (no copy for NumPy input)."""
    if is_cupy_array(array):
        return array.get()
    return np.asarray(array)


def to_jax(array):
    """Hand an array to JAX: zero-copy through DLPack for CuPy, ``jnp.asarray`` otherwise.

    DLPack exporters disagree on strides of non-contiguous views (size-1 axes, negative or
    broadcast strides), so non-contiguous CuPy arrays are made C-contiguous first; that one copy
    happens on the device, never through host memory.
    """
    import jax
    import jax.numpy as jnp

    if not is_cupy_array(array):
        return jnp.asarray(array)
    # CuPy Backend: DLPack needs a dense, C-ordered buffer to be shared safely.
    if not array.flags.c_contiguous:
        array = array.copy(order="C")
    return jax.dlpack.from_dlpack(array)
