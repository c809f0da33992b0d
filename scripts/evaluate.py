#!/usr/bin/env python
"""Rebuild the test report of training runs from their checkpoints, and aggregate several.

    python scripts/evaluate.py --workdir runs/signs-axial-all
    python scripts/evaluate.py --workdir runs/signs-axial-all runs/signs-coronal-all \
        runs/signs-sagittal-all --out runs/signs-report
"""

import argparse
import sys
from pathlib import Path

from sapsam_jax.evaluate import find_trained_runs, rebuild_predictions, write_report


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
    runs = find_trained_runs(args.workdir)
    if not runs:
        missing = [str(p) for p in args.workdir if not Path(p).exists()]
        where = ", ".join(map(str, args.workdir))
        print(
            f"error: {', '.join(missing)} does not exist"
            if missing
            else f"error: no training run (config.json + checkpoints/) below {where}",
            file=sys.stderr,
        )
        return 2
    if not args.no_rebuild:
        for run in runs:
            print(f"predicting test patients of {run}", flush=True)
            rebuild_predictions(run)
    extra = {"localisation": localisation(runs)} if args.localisation else None
    out = args.out or args.workdir[0]
    write_report(args.workdir, out, extra=extra)
    print(f"report: {out / 'report.md'}")
    return 0


def localisation(runs) -> list:
    """Localisation scores of every sign run whose cache has lesion truth (explain stage)."""
    from sapsam_jax.explain import localisation_report

    return localisation_report(runs)


if __name__ == "__main__":
    sys.exit(main())
