"""``python scripts/gradcam.py``: Fig. 3-style Grad-CAM figures and 3-D PSAMs of trained runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sapsam_jax.config import SIGNS, SUBREGIONS
from sapsam_jax.data._cache import CacheError, atomic_write_json, nonfinite_to_null, to_jsonable
from sapsam_jax.explain._gradcam import CAM_METHODS

EPILOG = """examples:
  python scripts/gradcam.py --workdir runs/signs-axial-all --study SYN0003_S01
  python scripts/gradcam.py --workdir runs/signs-axial-all runs/signs-coronal-all \\
      runs/signs-sagittal-all --all --sign fungus_ball --out runs/gradcam   # 3-D: all axes
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
        help="sign runs: positive (predicted p >= --threshold, else the top one), all, or "
        "sub-region names; whole-scan runs (disease, survival) explain the scan",
    )
    parser.add_argument(
        "--threshold",
        type=_probability,
        default=0.5,
        help="probability at which a sub-region counts as positive (0-1, default 0.5)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: <first workdir>/gradcam)"
    )
    parser.add_argument(
        "--localisation",
        action="store_true",
        help="also score localisation against lesion truth (synthetic cohort): every study of "
        "--split (whatever --study says), with the runs of --sign",
    )
    return parser


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a probability in 0-1, not {text}")
    return value


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keywords = {"positive", "all"} & set(args.subregions)
    if keywords and len(args.subregions) > 1:
        parser.error(f"--subregions {' / '.join(sorted(keywords))} stands alone, not with names")
    try:
        return _run(args)
    except (CacheError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from sapsam_jax.explain._study import find_workdirs, run_sets, set_name

    runs = _load_runs(find_workdirs(args.workdir))
    out = args.out or args.workdir[0] / "gradcam"
    sets = [s for s in run_sets(runs) if _wanted_labels(s, args.sign)]
    if not sets:
        raise ValueError(f"no run predicts any of {args.sign}")
    names = [set_name(members, runs) for members in sets]
    for n, (members, name) in enumerate(zip(sets, names, strict=True)):
        # Runs that cannot share one figure folder (two seeds, --sign all beside --sign multi)
        # each get their own; sets whose workdirs share a folder are told apart by number.
        if names.count(name) > 1:
            name = f"{name}-{n + 1}"
        _explain_set(members, args, out / name if len(sets) > 1 else out)
    return 0


def _load_runs(workdirs) -> list:
    from sapsam_jax.train import load_trained

    runs = []
    for workdir in workdirs:
        try:
            runs.append(load_trained(workdir))
        except FileNotFoundError as err:  # a run still in its first epoch: not an error here
            print(f"warning: skipped {workdir}: {err}", file=sys.stderr)
    if not runs:
        where = ", ".join(map(str, workdirs))
        raise FileNotFoundError(f"no trained run (with a checkpoint) under {where}")
    return runs


def _wanted_labels(runs, labels) -> bool:
    from sapsam_jax.explain._study import run_labels

    return labels is None or any(set(labels) & set(run_labels(r)) for r in runs)


def _missing_studies(cache, missing) -> str:
    """Which --study ids the cache lacks; a patient id given for a study id (a natural slip:
    SYN0002 for SYN0002_S01) is answered with that patient's study ids."""
    what = f"study {missing[0]} is" if len(missing) == 1 else f"studies {', '.join(missing)} are"
    message = f"{what} not in the cache {cache.path}"
    by_patient: dict[str, list[str]] = {}
    for sid in cache.study_ids:
        by_patient.setdefault(str(cache.meta(sid).get("patient_id")), []).append(sid)
    hints = [
        f"{m} is a patient; its studies are {', '.join(by_patient[m])}"
        for m in missing
        if m in by_patient
    ]
    if hints:
        return f"{message} ({'; '.join(hints)})"
    ids = cache.study_ids
    count = f"{len(ids)} stud{'y' if len(ids) == 1 else 'ies'}"
    return f"{message}; it holds {count}: {', '.join(ids[:4])}" + (", ..." if len(ids) > 4 else "")


def _explain_set(runs, args, out: Path) -> None:
    from sapsam_jax.explain._localisation import localisation_scores
    from sapsam_jax.explain._study import explain_study, in_split, split_studies

    cache = runs[0].cache
    runs = [r for r in runs if _wanted_labels([r], args.sign)]  # the runs of the asked labels
    if args.study:
        missing = [s for s in args.study if s not in cache]
        if missing:
            raise CacheError(_missing_studies(cache, missing))
        chosen = {s: runs for s in args.study}
    else:
        # Per study the runs whose --split holds its patient: runs of other signs, tasks or
        # seeds split patients differently, and a training scan says little about a network.
        ids = sorted({s for r in runs for s in split_studies(r, args.split)})
        chosen = {s: [r for r in runs if in_split(r, s, args.split)] for s in ids}
        if not chosen:
            raise ValueError(f"the runs' {args.split} splits hold no study")
    which = args.subregions[0] if len(args.subregions) == 1 else args.subregions
    if which in SUBREGIONS:
        which = [which]
    for study_id, here in chosen.items():
        trained_on = [str(r.workdir) for r in here if in_split(r, study_id, "train")]
        if trained_on:
            print(
                f"warning: {study_id} is a training scan of {', '.join(trained_on)}",
                file=sys.stderr,
            )
        summary = explain_study(
            here,
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
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "localisation.json", nonfinite_to_null(to_jsonable(scores)))
        print(f"localisation: {out / 'localisation.json'}")
        if not scores["records"]:
            print(
                f"warning: no localisation scores: no {args.split} sub-region of these sign "
                "runs holds a lesion of their sign in the cache's lesion truth (the manifest's "
                "lesion_labels column; the synthetic cohort has it)",
                file=sys.stderr,
            )


def _describe(summary: dict) -> str:
    """One line per study: each label/sub-region, with its 3-D PSAM maximum where there is one
    (a PSAM that is zero everywhere has none; summary.json says why)."""
    parts = []
    for label, regions in summary["labels"].items():
        for region, entry in regions.items():
            where = ""
            if "psam3d" in entry:
                peak = entry["psam3d"]["maximum"]
                where = " no 3-D maximum" if peak is None else _lps_text(peak)
            parts.append(f"{label}/{region}{where}")
    return "; ".join(parts)


def _lps_text(peak: dict) -> str:
    return f" max at {[round(v) for v in peak['lps_mm']]} mm LPS"
