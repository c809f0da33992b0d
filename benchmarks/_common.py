"""Shared by the benchmarks: timing with device sync, and the JSON record of a run.

Every result file says when, where (CPU model, GPU name), with what (package versions) and at
which git commit it was measured, so numbers in the READMEs can be traced back.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import platform
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from sapsam_jax.data._cache import atomic_write_bytes, nonfinite_to_null

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_PACKAGES = (
    "sapsam-jax",
    "numpy",
    "scipy",
    "scikit-image",
    "jax",
    "flax",
    "optax",
    "cupy",
    "cucim",
    "pydicom",
    "nibabel",
    "torch",
)


def git_commit() -> str | None:
    """HEAD of the checkout the benchmark runs from (with ``-dirty`` if files changed)."""
    root = Path(__file__).resolve().parents[1]
    git = ["git", "-C", str(root)]
    try:
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
        status = [*git, "status", "--porcelain", "--untracked-files=no"]
        dirty = subprocess.run(status, capture_output=True, text=True)
    except OSError:  # no git
        return None
    if head.returncode != 0 or dirty.returncode != 0:  # not a checkout, or one git refuses
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


# The code a benchmark runs is the code it imported at its start: a commit made while it runs
# (hours, for the learning benchmark) must not be recorded as the one measured.
_COMMIT_AT_START = git_commit()
_STARTED = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_name() -> str | None:
    try:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        return props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    except Exception:  # no CuPy, no driver, no device: ask JAX
        pass
    try:
        import jax

        gpus = [d for d in jax.devices() if d.platform != "cpu"]
        return gpus[0].device_kind if gpus else None
    except Exception:
        return None


def _versions() -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            # CUDA builds are distributed as cupy-cuda12x, cucim-cu13, ...: ask the module.
            out[name] = _module_version(name)
    return out


def _module_version(name: str) -> str | None:
    if name not in ("cupy", "cucim"):
        return None
    try:
        return importlib.import_module(name).__version__
    except Exception:  # not installed, or no CUDA driver to import against
        return None


def environment() -> dict:
    """Date, device, versions and commit of this run."""
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),  # written
        "started": _STARTED,  # when the measured code (git_commit) was imported
        "device": {
            "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "gpu": _gpu_name(),
        },
        "versions": _versions(),
        "git_commit": _COMMIT_AT_START,
        **({"git_commit_at_end": end} if (end := git_commit()) != _COMMIT_AT_START else {}),
    }


def synchronize(backend_name: str) -> None:
    """Wait for queued GPU work, so a timer measures work done rather than work launched."""
    if backend_name == "gpu":
        import cupy

        cupy.cuda.get_current_stream().synchronize()


def timed(fn, backend_name: str = "cpu", repeat: int = 1):
    """(best seconds over ``repeat`` calls, last result) of ``fn()``, synchronized on the GPU."""
    best, result = float("inf"), None
    for _ in range(max(repeat, 1)):
        synchronize(backend_name)
        start = time.perf_counter()
        result = fn()
        synchronize(backend_name)
        best = min(best, time.perf_counter() - start)
    return best, result


def same_device_kind(jax_platform: str, torch_device: str) -> bool:
    """Whether JAX (``jax.default_backend()``) and torch (``"cpu"``/``"cuda"``) ran on the same
    kind of device: a ratio of a GPU run over a CPU run measures the devices, not the code."""
    return (jax_platform == "cpu") == (torch_device == "cpu")


def write_json(record: dict, name: str, out: str | Path | None = None) -> Path:
    """Write ``environment() | record`` to ``out`` or ``results/<name>_<timestamp>.json``."""
    record = nonfinite_to_null({**environment(), **record})  # strict JSON: NaN -> null
    if out is None:
        stamp = record["date"].replace(":", "").replace("-", "")[:15]
        out = RESULTS_DIR / f"{name}_{stamp}.json"
        if out.exists():  # two runs in one second
            out = out.with_name(f"{out.stem}-{os.getpid()}.json")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2, sort_keys=False, allow_nan=False) + "\n"
    atomic_write_bytes(out, text.encode())  # never a half-written result
    return out
