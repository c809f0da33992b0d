"""Time ``sapsam_jax.io.load_ct`` on a DICOM series against reading the files one by one.

The issue's bar: reading a 512-slice series must not be slower than a plain pydicom loop over
the same files. A synthetic series (shuffled file names, so sorting matters) is written to a
temporary folder; after one warm-up call each (page cache filled) both readers run in
``--repeat`` alternating rounds and the medians are compared. JSON goes to ``benchmarks/results/``::

    python benchmarks/bench_io.py                      # 512 slices of 512x512 (the real case)
    python benchmarks/bench_io.py --slices 64 --size 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json  # noqa: E402

from sapsam_jax.io import load_ct  # noqa: E402

INTERCEPT = -1024


def write_series(folder: Path, slices: int, size: int, seed: int = 0) -> None:
    """A synthetic axial CT series: unsigned stored values with the usual -1024 intercept."""
    rng = np.random.default_rng(seed)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    names = rng.permutation(slices)  # file names in random order: the reader must sort
    base = rng.integers(0, 2000, size=(size, size), dtype=np.uint16)
    for n in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = "CT", study, series
        ds.FrameOfReferenceUID, ds.InstanceNumber = frame, n + 1
        ds.ImagePositionPatient = [-250.0, -250.0, -400.0 + 1.25 * n]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.75, 0.75], 1.25
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, INTERCEPT
        ds.PixelData = np.roll(base, n, axis=0).tobytes()
        ds.save_as(folder / f"{names[n]:05d}.dcm", enforce_file_format=True)


def naive_read(folder: Path) -> np.ndarray:
    """The baseline: pydicom one file at a time, sort by z, stack (no checks, no rescale)."""
    datasets = [pydicom.dcmread(path) for path in sorted(folder.iterdir())]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    return np.stack([ds.pixel_array for ds in datasets])


def timed_side_by_side(functions: dict, folder: Path, repeat: int):
    """Wall and process-CPU seconds of ``repeat`` rounds, each calling every function once (in
    alternating order), after one warm-up call each; and the last results.

    Alternating rounds put both readers under the same load (another job on the cores, the page
    cache) instead of one block after the other. CPU seconds (all threads) show the work done
    even when other jobs share the cores.
    """
    results = {name: fn(folder) for name, fn in functions.items()}
    wall = {name: [] for name in functions}
    cpu = {name: [] for name in functions}
    names = list(functions)
    for round_index in range(repeat):
        for name in names if round_index % 2 == 0 else names[::-1]:
            start, start_cpu = time.perf_counter(), time.process_time()
            results[name] = functions[name](folder)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu, results


def run(slices: int, size: int, repeat: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_io_") as tmp:
        folder = Path(tmp)
        write_series(folder, slices, size)
        readers = {"load_ct": lambda f: load_ct(f).hu, "naive_pydicom_loop": naive_read}
        wall, cpu, results = timed_side_by_side(readers, folder, repeat)
    naive = results["naive_pydicom_loop"].astype(np.int32) + INTERCEPT
    if not np.array_equal(results["load_ct"], naive):
        raise AssertionError("load_ct and the naive loop read different volumes")
    median = {name: statistics.median(seconds) for name, seconds in wall.items()}
    return {
        "benchmark": "io.load_ct vs naive pydicom loop",
        "params": {"slices": slices, "rows": size, "columns": size, "repeat": repeat},
        "timing": "one warm-up call each, then alternating rounds; medians",
        "seconds": wall,
        "cpu_seconds": cpu,
        "median_s": median,
        "speedup": median["naive_pydicom_loop"] / median["load_ct"],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=512)
    parser.add_argument("--size", type=int, default=512, help="rows = columns")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    args = parser.parse_args(argv)
    result = run(args.slices, args.size, args.repeat)
    path = write_json(result, f"bench_io_{args.slices}x{args.size}", args.out)
    print(json.dumps(result["median_s"]), f"speedup {result['speedup']:.2f}x ->", path)


if __name__ == "__main__":
    main()
