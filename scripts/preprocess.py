"""Preprocess a cohort manifest into the projection cache (README, "Preprocessing a cohort").

    python scripts/preprocess.py --manifest cohort.csv --out cache/ --preset paper
    python scripts/preprocess.py --manifest cohort.csv --out cache/ --workers 4   # 4 GPUs
    python scripts/preprocess.py --manifest cohort.csv --out cache/ --shard 1/8   # machine 1 of 8

Rerunning the same command resumes: finished studies are skipped, failed ones retried.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time

from sapsam_jax.backend import BACKEND_NAMES, BackendError, get_backend, gpu_available
from sapsam_jax.config import PREPROCESS_PRESETS, preprocess_preset
from sapsam_jax.data._cache import (
    QC_CSV,
    STUDIES_DIR,
    CacheError,
    init_cache_dir,
    merge_summaries,
)
from sapsam_jax.data._cohort import (
    manifest_studies,
    parse_shard,
    preprocess_cohort,
    shard_studies,
)
from sapsam_jax.data._qc import QC_FIELDS, qc_row
from sapsam_jax.io import ManifestError, read_manifest


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--manifest", required=True, help="cohort CSV (docs/ARCHITECTURE.md)")
    p.add_argument("--out", required=True, help="cache folder (created; resumed if it exists)")
    p.add_argument("--backend", choices=BACKEND_NAMES, default=None, help="default: auto")
    p.add_argument(
        "--preset",
        choices=sorted(PREPROCESS_PRESETS),
        default="paper",
        help="default: paper (the paper's grid: minutes per scan on a CPU; quick for a try)",
    )
    p.add_argument("--grid", help="override the preset's grid_shape, K,J,I (e.g. 24,32,32)")
    p.add_argument("--shard", help="i/n: process every n-th study from the i-th (many machines)")
    p.add_argument("--workers", type=int, default=1, help="processes on this machine (1 per GPU)")
    p.add_argument("--qc-png", action="store_true", help="write qc.png (mask overlay) per study")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="log tracebacks of failed studies")
    return p.parse_args(argv)


def build_config(args):
    config = preprocess_preset(args.preset)
    if args.grid:
        grid = _grid_shape(args.grid)
        geometry = dataclasses.replace(config.geometry, grid_shape=grid)
        name = f"{config.name}-grid{'x'.join(map(str, grid))}"
        config = dataclasses.replace(config, name=name, geometry=geometry)
    return config


def _grid_shape(text: str) -> tuple[int, int, int]:
    try:
        grid = tuple(int(v) for v in text.split(","))
    except ValueError:
        grid = ()
    if len(grid) != 3 or min(grid) < 3:
        raise ValueError(f"--grid takes 3 whole numbers >= 3, K,J,I (e.g. 24,32,32), not {text!r}")
    return grid


def run(args) -> int:
    config = build_config(args)
    manifest = read_manifest(args.manifest)
    shard = parse_shard(args.shard) if args.shard else None
    if args.workers < 1:
        raise ValueError(f"--workers takes a whole number >= 1, not {args.workers}")
    if args.workers > 1:
        get_backend(args.backend)  # an unusable backend fails here once, not in every worker
        return launch_workers(args, manifest, config, shard or (0, 1))
    result = preprocess_cohort(
        manifest,
        args.out,
        config=config,
        backend=args.backend,
        shard=shard,
        qc_png=args.qc_png,
        progress=not args.no_progress,
    )
    print(
        f"shard {result.shard[0]}/{result.shard[1]}: {result.done} done, {result.skipped} "
        f"already cached, {result.failed} failed in {result.seconds:.0f} s -> {args.out}",
        file=sys.stderr,
    )
    if result.failed:
        print(
            f"failed studies and reasons: {os.path.join(args.out, 'failures.csv')}", file=sys.stderr
        )
    mine = {s.study_id for s in shard_studies(manifest_studies(manifest), result.shard)}
    warn_implausible(args.out, config, mine)
    return 0


def warn_implausible(out, config, study_ids) -> None:
    """Name the studies of ``study_ids`` (this shard's: each worker names its own) whose lung
    volume QC flags (README, "Quality control"): they count as done, so without this line only
    qc.csv tells a partial scan or a leaked mask."""
    path = os.path.join(out, QC_CSV)
    if not os.path.isfile(path):
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    flagged = [
        r["study_id"]
        for r in rows
        if r["study_id"] in study_ids and r["lung_volume_implausible"] == "1"
    ]
    if not flagged:
        return
    lo, hi = (v / 1000 for v in config.geometry.plausible_lung_ml)
    more = len(flagged) - 10
    shown = ", ".join(flagged[:10]) + (f" and {more} more" if more > 0 else "")
    print(
        f"warning: {len(flagged)} cached stud{'y has' if len(flagged) == 1 else 'ies have'} a lung "
        f"volume outside {lo:g}-{hi:g} L (a missed lung, a partial scan or a mask leak): "
        f"{shown}; see lung_volume_ml in {path}, and qc.png with --qc-png",
        file=sys.stderr,
    )


def worker_shards(shard, workers: int) -> list[tuple[int, int]]:
    """Machine shard ``(i, n)`` split over ``w`` workers: shards ``i*w + k`` of ``n*w``."""
    index, count = shard
    return [(index * workers + k, count * workers) for k in range(workers)]


# Set in the environment of the processes launch_workers starts.
_WORKER_ENV = "SAPSAM_PREPROCESS_WORKER"


def launch_workers(args, manifest, config, shard) -> int:
    """One child process per worker, each a sub-shard of ``shard`` pinned to its own GPU.

    Machine shard ``(i, n)`` with ``w`` workers becomes shards ``i*w + k`` of ``n*w``; children
    share nothing but the output folder, so a killed worker is simply resumed by a rerun.
    """
    init_cache_dir(args.out, config)  # config mismatch fails once here, not in every child
    gpus = _gpu_ids(args.backend)
    procs = []
    for k, (index, count) in enumerate(worker_shards(shard, args.workers)):
        child_shard = f"{index}/{count}"
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[k % len(gpus)]
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            *_child_argv(args),
            "--shard",
            child_shard,
        ]
        env[_WORKER_ENV] = "1"  # Ctrl-C reaches every worker: only this process says so
        procs.append(subprocess.Popen(cmd, env=env))
    try:
        _watch(procs, args, manifest, shard)
    except KeyboardInterrupt:
        _stop(procs)  # a SIGINT to this process alone must not leave workers running
        raise
    codes = [p.wait() for p in procs]
    # A killed worker (OOM killer: -9) never merged its shard's summaries: merge them here.
    merge_summaries(args.out, QC_FIELDS, qc_row)
    failed = [(k, code) for k, code in enumerate(codes) if code != 0]
    for k, code in failed:
        print(
            f"preprocess: worker {k} exited with {code}; rerun to finish its studies",
            file=sys.stderr,
        )
    return 0 if not failed else max(1, max(code for _, code in failed))


def _stop(procs) -> None:
    """Interrupt the workers (each keeps its finished studies) and wait for them."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc in procs:
        proc.wait()


def _child_argv(args) -> list[str]:
    argv = [
        "--manifest",
        args.manifest,
        "--out",
        args.out,
        "--preset",
        args.preset,
        "--no-progress",
    ]
    for flag, value in (("--backend", args.backend), ("--grid", args.grid)):
        if value:
            argv += [flag, value]
    flags = [flag for flag, on in (("--qc-png", args.qc_png), ("--verbose", args.verbose)) if on]
    return argv + flags


def _gpu_ids(backend: str | None) -> list[str]:
    if (backend or os.environ.get("SAPSAM_BACKEND", "auto")) == "cpu" or not gpu_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [v.strip() for v in visible.split(",") if v.strip()]
    import cupy

    return [str(i) for i in range(cupy.cuda.runtime.getDeviceCount())]


def _watch(procs, args, manifest, shard) -> None:
    """One progress bar for all workers, counting this machine's studies as they appear."""
    from tqdm.auto import tqdm

    # The workers' sub-shards, not every n-th row: the same only when n is 1.
    studies_of_manifest = manifest_studies(manifest)
    ids = {
        s.study_id
        for sub in worker_shards(shard, args.workers)
        for s in shard_studies(studies_of_manifest, sub)
    }
    studies = os.path.join(args.out, STUDIES_DIR)
    with tqdm(total=len(ids), unit="study", disable=args.no_progress, desc="preprocess") as bar:
        while any(p.poll() is None for p in procs):
            bar.update(len(ids.intersection(os.listdir(studies))) - bar.n)
            time.sleep(2.0)
        bar.update(len(ids.intersection(os.listdir(studies))) - bar.n)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:  # our tracebacks, not every library's debug chatter (matplotlib's fonts)
        logging.getLogger("sapsam_jax").setLevel(logging.DEBUG)
    try:
        return run(args)
    except (ManifestError, CacheError, BackendError, ValueError, OSError) as err:
        print(f"preprocess.py: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # finished studies are kept; the one in progress left no files
        if not os.environ.get(_WORKER_ENV):  # a terminal's Ctrl-C interrupts every worker too
            print("preprocess.py: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
