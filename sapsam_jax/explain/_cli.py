"""``python scripts/gradcam.py``: Fig. 3-style Grad-CAM figures and 3-D PSAMs of trained runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sapsam_jax.config import SIGNS, SUBREGIONS
from sapsam_jax.explain._gradcam import CAM_METHODS

EPILOG = """examples:
  python scripts/gradcam.py --workdir runs/signs-axial --study S0003
  python scripts/gradcam.py --workdir runs/signs-axial runs/signs-coronal runs/signs-sagittal \\
      --all --sign fungus_ball --out runs/gradcam        # 3-D PSAMs need all three axes
  python scripts/gradcam.py --workdir runs --all --localisation
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/gradcam.py",
        description="Grad-CAM maps (paper 2.5, eq. (1)) of trained runs drawn over the projection "
        "and the CT (paper Fig. 3); 3-D PSAMs as NIfTI where a sign has runs on all three axes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--workdir",
        nargs="+",
        required=True,
        type=Path,
        help="training workdir(s), or folders holding them (searched 2 levels)",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", nargs="+", help="study id(s) of the cache")
    which.add_argument("--all", action="store_true", help="every study of --split")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument(
        "--sign",
        nargs="+",
        choices=SIGNS + ("disease", "survival"),
        help="labels to explain (default: every label of the runs)",
    )
    parser.add_argument(
        "--method",
        default=None,
        choices=CAM_METHODS,
        help="map method (default: the run's cam_method; the paper's is gradcam)",
    )
    parser.add_argument(
        "--layer",
        default=None,
        help="model layer of the maps, e.g. block5_conv4 (default: the run's cam_layer, "
        "else the last convolution)",
    )
    parser.add_argument(
        "--subregions",
        nargs="+",
        default=["positive"],
        choices=("positive", "all") + SUBREGIONS,
        help="positive: predicted p >= --threshold (else the top one)",
    )
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: <first workdir>/gradcam)"
    )
    parser.add_argument(
        "--localisation",
        action="store_true",
        help="also score localisation against lesion truth (synthetic cohort)",
    )
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from sapsam_jax.explain._localisation import localisation_scores
    from sapsam_jax.explain._study import explain_study, find_workdirs, split_studies
    from sapsam_jax.train import load_trained

    try:
        runs = [load_trained(w) for w in find_workdirs(args.workdir)]
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or args.workdir[0] / "gradcam"
    studies = args.study or sorted({s for r in runs for s in split_studies(r, args.split)})
    which = args.subregions[0] if len(args.subregions) == 1 else args.subregions
    if which in SUBREGIONS:
        which = [which]
    for study_id in studies:
        summary = explain_study(
            runs,
            study_id,
            out,
            method=args.method,
            layer=args.layer,
            subregions=which,
            threshold=args.threshold,
            labels=args.sign,
        )
        print(f"{study_id}: {out / study_id} ({_describe(summary)})", flush=True)
    if args.localisation:
        scores = localisation_scores(runs, args.split, method=args.method, layer=args.layer)
        (out / "localisation.json").write_text(json.dumps(scores, indent=2, default=float))
        print(f"localisation: {out / 'localisation.json'}")
    return 0


def _describe(summary: dict) -> str:
    parts = []
    for label, regions in summary["labels"].items():
        for region, entry in regions.items():
            peak = entry.get("psam3d", {}).get("maximum")
            where = f" max at {[round(v) for v in peak['lps_mm']]} mm LPS" if peak else ""
            parts.append(f"{label}/{region}{where}")
    return "; ".join(parts)
