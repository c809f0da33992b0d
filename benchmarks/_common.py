"""Shared by the benchmarks: timing with device sync, and the JSON record of a run.

Every result file says when, where (CPU model, GPU name), with what (package versions) and at
which git commit it was measured, so numbers in the READMEs can be traced back.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_PACKAGES = ("sapsam-jax", "numpy", "scipy", "scikit-image", "jax", "cupy", "cucim")


def git_commit() -> str | None:
    """HEAD of the checkout the benchmark runs from (with ``-dirty`` if files changed)."""
    root = Path(__file__).resolve().parents[1]
    git = ["git", "-C", str(root)]
    try:
        head = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
        status = [*git, "status", "--porcelain", "--untracked-files=no"]
        dirty = subprocess.run(status, capture_output=True, text=True, check=True)
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


# The code a benchmark runs is the code it imported at its start: a commit made while it runs
# (hours, for the learning benchmark) must not be recorded as the one measured.
_COMMIT_AT_START = git_commit()


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
    except Exception:  # no CuPy, no driver, no device
        return None


def _versions() -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def environment() -> dict:
    """Date, device, versions and commit of this run."""
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
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


def write_json(record: dict, name: str, out: str | Path | None = None) -> Path:
    """Write ``environment() | record`` to ``out`` or ``results/<name>_<timestamp>.json``."""
    record = {**environment(), **record}
    if out is None:
        stamp = record["date"].replace(":", "").replace("-", "")[:15]
        out = RESULTS_DIR / f"{name}_{stamp}.json"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")  # never a half-written result
    tmp.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, out)
    return out
