#!/usr/bin/env python
"""Generate the built-in synthetic CPA cohort (DICOM or NIfTI + manifest + lesion label maps).

python scripts/make_synthetic_cohort.py --out data/synthetic
python scripts/make_synthetic_cohort.py --out data/paper-size --patients 8 --shape 432 512 512
"""

import argparse
import sys
from pathlib import Path

from sapsam_jax.data.synthetic import DEFAULT_SHAPE, make_cohort


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="cohort folder (created)")
    parser.add_argument("--patients", type=int, default=24, help="number of patients")
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=DEFAULT_SHAPE,
        metavar=("K", "J", "I"),
        help="voxels per scan (k, j, i)",
    )
    parser.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        metavar=("DK", "DJ", "DI"),
        help="voxel size in mm (default: keep a ~280x346x346 mm field of view)",
    )
    parser.add_argument("--seed", type=int, default=0, help="cohort seed")
    parser.add_argument(
        "--format", choices=("dicom", "nifti"), default="dicom", help="CT file format"
    )
    parser.add_argument(
        "--scans",
        type=int,
        nargs=2,
        default=(1, 3),
        metavar=("MIN", "MAX"),
        help="longitudinal scans per patient",
    )
    parser.add_argument(
        "--control-fraction", type=float, default=0.25, help="share of control patients"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a cohort already in --out"
    )
    args = parser.parse_args(argv)
    try:
        manifest = _make(args)
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # finished patients are recorded in --out (.patients-done)
        print(
            "make_synthetic_cohort.py: interrupted; rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    print(f"manifest: {manifest}")
    return 0


def _make(args) -> Path:
    return make_cohort(
        args.out,
        n_patients=args.patients,
        shape=tuple(args.shape),
        spacing=tuple(args.spacing) if args.spacing else None,
        seed=args.seed,
        fmt=args.format,
        scans_per_patient=tuple(args.scans),
        control_fraction=args.control_fraction,
        progress=not args.quiet,
        overwrite=args.overwrite,
    )


if __name__ == "__main__":
    raise SystemExit(main())
