"""Time each preprocessing stage on both backends, side by side (paper 2.1-2.3).

    python benchmarks/bench_preprocess.py                 # paper-size scan + quick preset
    python benchmarks/bench_preprocess.py --quick         # quick preset only (CPU-friendly)
    python benchmarks/bench_preprocess.py --stages fused,unfused --backends gpu
    python benchmarks/bench_preprocess.py --cases paper --backends cpu --stages resample,rotate

Cases: ``paper`` is a synthetic 432x512x512 chest CT (0.7 mm pixels, 1 mm slices) on the paper's
grid; ``quick`` a 108x128x128 CT (4 x 2.8 x 2.8 mm) on the QUICK preset. Stages:

    masks     lung_masks conservative + refined on the CT grid (paper 2.1)
    resample  lung box -> working grid, HU and both masks (paper 2.3)
    rotate    27 rotate_volume of HU and both masks (unfused rotation alone)
    project   27 x (gray + six sub-region band images) x 3 axes of a working volume
    unfused   rotate_project(method="unfused"): rotate, then project
    fused     rotate_project(method="fused") on the GPU; its NumPy twin on the CPU
    scan      preprocess_scan, everything, results back on the host

Stages after ``masks`` start from fast threshold masks so every backend gets the same input;
``scan`` uses the real lung_masks. GPU stages run once untimed first (kernel compilation). JSON
goes to ``benchmarks/results/`` (device, versions, commit, seconds, scans/s, CPU/GPU ratio).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi_cpu

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import synchronize, timed, write_json  # noqa: E402

from sapsam_jax.backend import get_backend, gpu_available  # noqa: E402
from sapsam_jax.config import PAPER, QUICK  # noqa: E402
from sapsam_jax.preprocess import (  # noqa: E402
    _scan,  # noqa: E402
    lung_bbox,
    preprocess_scan,
    resample_to_grid,
    rotate_project,
    rotate_volume,
)
from sapsam_jax.preprocess._projection import _project_axes  # noqa: E402

STAGES = ("masks", "resample", "rotate", "project", "unfused", "fused", "scan")
CASES = {
    "paper": dict(shape=(432, 512, 512), spacing=(1.0, 0.7, 0.7), config=PAPER),
    "quick": dict(shape=(108, 128, 128), spacing=(4.0, 2.8, 2.8), config=QUICK),
}


def synthetic_chest(shape, spacing, seed: int = 0) -> np.ndarray:
    """int16 HU chest: body, two lungs with vessels-like noise, a fungus ball, a cavity.

    Built from open grids in float32 so a 432x512x512 volume needs ~2 GB, not ~10.
    """
    rng = np.random.default_rng(seed)
    k, j, i = (
        (np.arange(n, dtype=np.float32) / n).reshape([n if d == a else 1 for d in range(3)])
        for a, n in enumerate(shape)
    )
    hu = np.where(((j - 0.5) / 0.42) ** 2 + ((i - 0.5) / 0.46) ** 2 < 1, 40.0, -1000.0)
    hu = np.broadcast_to(hu, shape).astype(np.float32)
    for ci in (0.3, 0.7):  # patient's right (low i), left (high i)
        lung = ((k - 0.5) / 0.33) ** 2 + ((j - 0.5) / 0.3) ** 2 + ((i - ci) / 0.16) ** 2 < 1
        hu[lung] = -850.0
    ball = ((k - 0.7) / 0.03) ** 2 + ((j - 0.5) / 0.04) ** 2 + ((i - 0.72) / 0.04) ** 2 < 1
    hu[ball] = 30.0
    cavity = ((k - 0.68) / 0.05) ** 2 + ((j - 0.5) / 0.07) ** 2 + ((i - 0.72) / 0.07) ** 2 < 1
    hu[cavity & ~ball] = -1000.0
    hu += rng.standard_normal(shape, dtype=np.float32) * 20.0
    return hu.astype(np.int16)


def _off_border(binary: np.ndarray) -> np.ndarray:
    """Components of ``binary`` that touch no face of the volume."""
    labels, _ = ndi_cpu.label(binary)
    faces = (labels[0], labels[-1], labels[:, 0], labels[:, -1], labels[..., 0], labels[..., -1])
    return binary & ~np.isin(labels, np.unique(np.concatenate([f.ravel() for f in faces])))


def threshold_masks(hu: np.ndarray, threshold_hu: float) -> dict[str, np.ndarray]:
    """Fast stand-in masks: air off the volume's border (conservative), its holes filled.

    Holes are found by labelling (binary_fill_holes dilates for minutes at 432x512x512).
    """
    lungs = _off_border(hu < threshold_hu)
    return {"conservative": lungs, "refined": lungs | _off_border(~lungs)}


def _mask_stub(masks):
    """A _scan._lung_masks stand-in returning precomputed masks (used when _mask is missing)."""

    def lung_masks(hu, spacing, *, methods, config, backend):
        return {m: backend.asarray(masks[m]) for m in methods}

    return lung_masks


def _real_lung_masks():
    try:
        from sapsam_jax.preprocess._mask import lung_masks
    except ImportError:
        return None
    return lung_masks


def stage_functions(hu, spacing, masks, config, bk):
    """{stage: zero-argument callable} on backend ``bk``; inputs already on the device."""
    geometry, rotations = config.geometry, config.geometry.rotations()
    hu_d = bk.asarray(hu)
    masks_d = {k: bk.asarray(m) for k, m in masks.items()}
    bbox = lung_bbox(masks_d["refined"], spacing, geometry.bbox_margin_mm)
    work_hu, _ = resample_to_grid(hu_d, spacing, bbox, geometry)
    work = [work_hu] + [resample_to_grid(masks_d[k], spacing, bbox, geometry)[0] for k in masks_d]
    real_masks = _real_lung_masks()

    def masks_stage():
        return real_masks(hu_d, spacing, config=config.segmentation, backend=bk)

    def resample_stage():
        return [resample_to_grid(v, spacing, bbox, geometry)[0] for v in (hu_d, *masks_d.values())]

    def rotate_stage():
        for angles in rotations:
            for volume in work:
                rotate_volume(volume, angles, config=geometry)

    def project_stage():
        for _ in rotations:
            _project_axes(
                work[0], work[1], work[2], ("axial", "coronal", "sagittal"), config.projection, True
            )

    fused_method = "fused" if bk.is_gpu else "twin"
    funcs = {
        "masks": masks_stage if real_masks else None,
        "resample": resample_stage,
        "rotate": rotate_stage,
        "project": project_stage,
        "unfused": lambda: rotate_project(*work, rotations, config=config, method="unfused"),
        "fused": lambda: rotate_project(*work, rotations, config=config, method=fused_method),
        "scan": lambda: preprocess_scan(hu, spacing, config=config, backend=bk),
    }
    return funcs


def run_case(name, case, backends, stages, repeat, cpu_repeat=1):
    config, spacing = case["config"], case["spacing"]
    print(f"[{name}] building a {case['shape']} synthetic chest CT", flush=True)
    hu = synthetic_chest(case["shape"], spacing)
    masks = threshold_masks(hu, config.segmentation.threshold_hu)
    result = {
        "ct_shape": list(case["shape"]),
        "spacing_mm": list(spacing),
        "preset": config.name,
        "working_shape": list(config.geometry.working_shape),
        "seconds": {},
        "notes": {
            "fused": "on the CPU, the NumPy twin of the fused kernel (map_coordinates)",
            "timing": f"gpu: one warm-up run, then the best of {repeat}; cpu: the best of "
            f"{cpu_repeat} run(s) without warm-up (paper-grid CPU stages take minutes)",
            "copies": "gpu 'scan' starts from the CT in host memory and ends with the "
            "projections there (copies included); the other gpu stages start on the device",
        },
    }
    if _real_lung_masks() is None:
        result["notes"]["masks"] = "sapsam_jax.preprocess._mask missing: scan used threshold masks"
        _scan._lung_masks = _mask_stub(masks)
    for backend_name in backends:
        bk = get_backend(backend_name)
        funcs = stage_functions(hu, spacing, masks, config, bk)
        seconds = result["seconds"].setdefault(backend_name, {})
        for stage in stages:
            fn = funcs.get(stage)
            if fn is None:
                continue
            if bk.is_gpu:
                fn()  # compile kernels, warm the memory pool
                synchronize("gpu")
            seconds[stage], _ = timed(fn, backend_name, repeat if bk.is_gpu else cpu_repeat)
            print(f"[{name}] {backend_name:3s} {stage:8s} {seconds[stage]:9.3f} s", flush=True)
        if bk.is_gpu:
            import cupy

            cupy.get_default_memory_pool().free_all_blocks()
    _summarise(result)
    return result


def _summarise(result):
    seconds = result["seconds"]
    result["scans_per_s"] = {b: 1.0 / s["scan"] for b, s in seconds.items() if "scan" in s}
    if "cpu" in seconds and "gpu" in seconds:
        cpu, gpu = seconds["cpu"], seconds["gpu"]
        result["cpu_over_gpu"] = {s: cpu[s] / gpu[s] for s in cpu if s in gpu and gpu[s] > 0}
    result["unfused_over_fused"] = {
        b: s["unfused"] / s["fused"] for b, s in seconds.items() if "unfused" in s and "fused" in s
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the quick preset case")
    parser.add_argument("--cases", default=None, help="comma-separated: paper,quick")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages")
    parser.add_argument("--backends", default=None, help="cpu,gpu (default: cpu + gpu if any)")
    parser.add_argument("--repeat", type=int, default=3, help="GPU timings: best of N")
    parser.add_argument(
        "--cpu-repeat", type=int, default=1, help="CPU timings: best of N (default 1, cold)"
    )
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/)")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    backends = (
        args.backends.split(",")
        if args.backends
        else (["cpu", "gpu"] if gpu_available() else ["cpu"])
    )
    # Only the exact names: timed() waits for the device under "gpu" alone (get_backend would
    # also take "auto" or "GPU", and their GPU timings would count kernel launches).
    if set(backends) - {"cpu", "gpu"}:
        parser.error(f"unknown backends in {args.backends!r}; choose from cpu, gpu")
    cases = args.cases.split(",") if args.cases else ["quick"] if args.quick else list(CASES)
    if set(cases) - set(CASES):
        parser.error(f"unknown cases in {args.cases!r}; choose from {', '.join(CASES)}")
    record = {"benchmark": "preprocess", "stages": stages, "backends": backends, "cases": {}}
    for name in cases:
        record["cases"][name] = run_case(
            name, CASES[name], backends, stages, args.repeat, args.cpu_repeat
        )
    path = write_json(record, "preprocess" + ("_quick" if args.quick else ""), args.out)
    print(f"wrote {path}")
    return record


if __name__ == "__main__":
    main()
