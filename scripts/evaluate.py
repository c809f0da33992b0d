#!/usr/bin/env python
"""Rebuild the test report of training runs from their checkpoints, and aggregate several.

    python scripts/evaluate.py --workdir runs/signs-axial-all
    python scripts/evaluate.py --workdir runs/signs-axial-all runs/signs-coronal-all \
        runs/signs-sagittal-all --out runs/signs-report
"""

import argparse
import sys
from pathlib import Path

from sapsam_jax.data._cache import CacheError
from sapsam_jax.evaluate import (
    ReportError,
    find_runs,
    find_trained_runs,
    rebuild_predictions,
    write_report,
)
from sapsam_jax.io import ManifestError
from sapsam_jax.train._loop import WorkdirError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir",
        nargs="+",
        required=True,
        type=Path,
        help="training workdir(s); runs below them are found recursively",
    )
    parser.add_argument("--out", type=Path, help="report folder (default: the first workdir)")
    parser.add_argument(
        "--no-rebuild",
        action="store_true",
        help="reuse saved test predictions instead of recomputing them",
    )
    parser.add_argument(
        "--localisation",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add Grad-CAM localisation scores for sign runs with lesion truth",
    )
    args = parser.parse_args(argv)
    problems = [p for w in args.workdir if (p := workdir_problem(w))]
    if problems:
        for problem in problems:  # a mistyped axis must not just drop out of the table
            print(f"error: {problem}", file=sys.stderr)
        return 2
    runs = find_trained_runs(args.workdir)
    warn_skipped(args.workdir, runs, args.no_rebuild)
    try:
        if not args.no_rebuild:
            for run in runs:
                print(f"predicting test patients of {run}", flush=True)
                rebuild_predictions(run)
        if not find_runs(args.workdir):
            # An empty table (over the last good report.md) and exit 0 would look like success.
            print(
                "error: no run to report: none has a checkpoint or saved test predictions",
                file=sys.stderr,
            )
            return 2
        rows = localisation(runs) if args.localisation else []
        extra = {"localisation": rows} if rows else None  # as training writes it: no empty key
        out = args.out or args.workdir[0]
        write_report(args.workdir, out, extra=extra)
    except (ReportError, WorkdirError, CacheError, ManifestError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # predictions are replaced atomically: each run's old or new
        print("evaluate.py: interrupted; rerun the same command", file=sys.stderr)
        return 130
    print(f"report: {out / 'report.md'}")
    return 0


def workdir_problem(workdir: Path) -> str | None:
    """Why ``workdir`` adds no run to the report, or None."""
    if not workdir.exists():
        return f"{workdir} does not exist"
    if not find_runs([workdir], marker="run.json"):
        return f"no training run (config.json + run.json) at or below {workdir}"
    return None


def warn_skipped(workdirs, runs, no_rebuild: bool) -> None:
    """Name the run folders the report leaves out, so no row vanishes without a word."""
    saved = set(find_runs(workdirs))  # runs with predictions_test.npz: write_report's rows
    for run in find_runs(workdirs, marker="run.json"):
        if no_rebuild and run not in saved:
            print(
                f"warning: {run} left out of the report: no saved test predictions", file=sys.stderr
            )
        elif not no_rebuild and run not in runs:  # no checkpoint to predict with
            if run not in saved:
                print(f"warning: {run} left out of the report: no checkpoint yet", file=sys.stderr)
            else:  # e.g. copied without checkpoints: reported, from predictions it cannot redo
                print(
                    f"warning: {run} has no checkpoint: its saved test predictions are reported "
                    "as they are, not rebuilt",
                    file=sys.stderr,
                )


def localisation(runs) -> list:
    """Localisation scores of every sign run whose cache has lesion truth (explain stage)."""
    from sapsam_jax.explain import localisation_report

    return localisation_report(runs)


if __name__ == "__main__":
    sys.exit(main())
