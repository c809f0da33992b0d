"""Test-wide determinism: 2 fake CPU devices (so sharding code runs on CPU), CPU backend, paths."""

import os
from pathlib import Path

# Must happen before JAX initialises its backends (equinox tests/conftest.py does the same).
# Appended, not set by default: a GPU host often has XLA_FLAGS set already (the sharded tests
# need the 2 fake devices whatever else it holds).
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=2".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("SAPSAM_BACKEND", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_CT_DIR = REPO_ROOT.parent / "shared" / "data" / "real_ct"


@pytest.fixture(scope="session")
def real_ct_dir() -> Path:
    """The real chest CT shipped beside the repo (see shared/data/real_ct/README.md)."""
    if not REAL_CT_DIR.is_dir():
        pytest.skip(f"real CT data not found at {REAL_CT_DIR}")
    return REAL_CT_DIR


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _cupy_device_available() -> bool:
    from sapsam_jax.backend import gpu_available

    return gpu_available()


def pytest_collection_modifyitems(config, items):
    """Skip `gpu`-marked tests cleanly where CuPy sees no CUDA device."""
    if _cupy_device_available():
        return
    skip_gpu = pytest.mark.skip(reason="no CUDA device visible to CuPy")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
