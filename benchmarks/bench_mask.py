"""Time the lung masks (paper 2.1) and the watershed behind them, CPU against GPU.

Each function is paired by name across backends: ``lung_masks`` (both masks, shared markers) on
NumPy and on CuPy, and the refined mask's two-label watershed on a real edge map with
scikit-image, with the NumPy twin of the CUDA kernel and with the kernel itself. The GPU rows
are skipped where CuPy sees no device. JSON goes to ``benchmarks/results/``::

    python benchmarks/bench_mask.py                                   # A0001, 512x512x64
    python benchmarks/bench_mask.py --scan ../shared/data/real_ct/cip_ct64/ct.nii.gz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
from _common import timed, write_json
from skimage.segmentation import watershed as skimage_watershed

from sapsam_jax.backend import gpu_available
from sapsam_jax.io import load_ct
from sapsam_jax.preprocess._mask import lung_air, lung_masks
from sapsam_jax.preprocess._watershed import flood_gpu, flood_numpy, quantize_edges

DEFAULT_SCAN = (
    Path(__file__).resolve().parents[2] / "shared/data/real_ct/lung_pet_ct_dx/A0001_chest_5mm_dicom"
)


def watershed_case(hu, spacing):
    """The refined mask's flooding problem: lung markers against the ring 9 mm out."""
    lung, _ = lung_air(hu, spacing)
    distance = ndi.distance_transform_edt(~lung, sampling=spacing)
    markers = np.where(lung, 2, np.where(distance > 9.0, 1, 0)).astype(np.int32)
    volume = hu.astype(np.float32)
    edge = np.sqrt(sum((ndi.sobel(volume, axis=a) / s) ** 2 for a, s in enumerate(spacing)))
    mask = distance <= 14.0
    return quantize_edges(edge, mask, 256), markers, mask


def bench_masks(hu, spacing, repeat: int) -> dict:
    rows = {}
    seconds, cpu = timed(lambda: lung_masks(hu, spacing, backend="cpu"), "cpu", repeat)
    rows["lung_masks"] = {"cpu_s": seconds}
    if gpu_available():
        import cupy

        volume = cupy.asarray(hu)
        lung_masks(volume, spacing)  # compile the kernels once
        seconds, gpu = timed(lambda: lung_masks(volume, spacing), "gpu", repeat)
        rows["lung_masks"]["gpu_s"] = seconds
        rows["lung_masks"]["cpu_over_gpu"] = rows["lung_masks"]["cpu_s"] / seconds
        for name, mask in gpu.items():
            mask = cupy.asnumpy(mask)
            dice = 2 * (mask & cpu[name]).sum() / (mask.sum() + cpu[name].sum())
            rows["lung_masks"][f"dice_gpu_cpu_{name}"] = float(dice)
    return rows


def bench_watershed(hu, spacing, repeat: int) -> dict:
    levels, markers, mask = watershed_case(hu, spacing)
    row = {"voxels_to_flood": int((mask & (markers == 0)).sum())}
    row["skimage_s"], reference = timed(
        lambda: skimage_watershed(levels, markers, mask=mask), "cpu", repeat
    )
    row["numpy_twin_s"], twin = timed(lambda: flood_numpy(levels, markers, mask), "cpu", repeat)
    row["twin_vs_skimage_agreement"] = float((twin == reference)[mask].mean())
    row["twin_over_skimage_s"] = row["numpy_twin_s"] / row["skimage_s"]
    if gpu_available():
        import cupy

        args = [cupy.asarray(a) for a in (levels, markers, mask)]
        flood_gpu(*args)
        row["gpu_kernel_s"], gpu = timed(lambda: flood_gpu(*args), "gpu", repeat)
        row["gpu_equals_twin"] = bool((cupy.asnumpy(gpu) == twin).all())
        row["skimage_over_gpu"] = row["skimage_s"] / row["gpu_kernel_s"]
    return {"watershed": row}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", type=Path, default=DEFAULT_SCAN)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    ct = load_ct(args.scan)
    record = {"scan": str(args.scan), "shape": list(ct.hu.shape), "spacing": list(ct.spacing)}
    record |= bench_masks(ct.hu, ct.spacing, args.repeat)
    record |= bench_watershed(ct.hu, ct.spacing, args.repeat)
    print(record)
    print(write_json(record, "mask", args.out))


if __name__ == "__main__":
    main()
