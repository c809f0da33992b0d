"""Learning check over several patient splits: test F1 and AUC of the quick preset per sign and
for the disease task, one run per split seed, and their mean. Issue targets: F1 >= 0.85 for every
sign (axial) and >= 0.9 for the disease task.

A single split of the 40-patient quick cohort tests 8 patients, so one patient moves a sign's F1 by
0.1-0.3; the mean over splits says more about the preset than any one of them (README,
"Measured on the synthetic cohort"). The cohort and its cache are built once (``--data-dir``)
and shared by every split; ``--seed`` of the trainer draws the split, the initial weights and the
augmentation.

    python benchmarks/bench_learning.py                           # signs and disease, seeds 0 1 2
    python benchmarks/bench_learning.py --tasks signs --seeds 0 1 --data-dir runs/data
    python benchmarks/bench_learning.py --preset tiny --seeds 0   # seconds, for a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json  # noqa: E402

from sapsam_jax.evaluate._report import per_scan  # noqa: E402
from sapsam_jax.train import binary_metrics, preset_config, train  # noqa: E402
from sapsam_jax.train._checkpoint import saved_epochs  # noqa: E402
from sapsam_jax.train._metrics import format_score  # noqa: E402

TARGET_F1 = {"cavity": 0.85, "fungus_ball": 0.85, "pleural_thickening": 0.85, "disease": 0.9}
METRICS = ("precision", "recall", "f1", "auc", "n", "n_positive")


def run_split(task: str, seed: int, args) -> list[dict]:
    """Train the preset's network(s) of ``task`` on split ``seed``; one row per network."""
    cfg = preset_config(args.preset, task).replace(
        axis=args.axis,
        seed=seed,
        data_dir=str(args.data_dir),
        workdir=str(args.workdir / f"{task}-{args.axis}-seed{seed}"),
    )
    if task == "signs":
        cfg = cfg.replace(sign="all")
    cfg = with_overrides(cfg, args.override)
    if not args.resume and any(Path(cfg.workdir).rglob("config.json")):
        # train() would resume the run there: finished, it reports the old network's scores
        # under this commit (and a run of other settings is refused).
        raise SystemExit(
            f"{cfg.workdir} holds a run already; pass a new --workdir, or --resume to finish it"
        )
    start = time.perf_counter()
    results = train(cfg, log=print)
    seconds = time.perf_counter() - start
    workdir = Path(cfg.workdir)
    return [
        {"task": task, "name": name, "seed": seed, "seconds": seconds}
        | {k: float(metrics[k]) for k in METRICS}
        | best_validation(workdir / name if len(results) > 1 else workdir)
        | scan_scores(workdir / name if len(results) > 1 else workdir)
        for name, metrics in results.items()
    ]


def scan_scores(run_dir: Path) -> dict:
    """Test F1 and AUC with one call per scan (sign tasks: per scan sub-region), the mean
    probability over its rotated projections, as report.md's per-scan table."""
    with np.load(run_dir / "predictions_test.npz") as pred:
        labels, probs, _ = per_scan(pred)
    metrics = binary_metrics(labels, probs)
    return {
        "scan_f1": metrics["f1"],
        "scan_auc": metrics["auc"],
        "scans": metrics["n"],
        "scan_positives": metrics["n_positive"],
    }


def with_overrides(cfg, overrides: dict):
    """``cfg`` with TrainConfig fields replaced; ``synthetic.FIELD`` keys change the cohort."""
    cohort = {k.removeprefix("synthetic."): v for k, v in overrides.items() if "." in k}
    cfg = cfg.replace(**{k: v for k, v in overrides.items() if "." not in k})
    if cohort:
        cfg = cfg.replace(synthetic=dataclasses.replace(cfg.synthetic, **cohort))
    return cfg


def best_validation(run_dir: Path) -> dict:
    """Validation F1 and AUC of the kept epoch (the run's best checkpoint, chosen by its
    select_by), from metrics.jsonl: what a preset may be chosen on, unlike the test scores."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "val_loss" in r]
    kept = saved_epochs(run_dir, "best")
    if not records or not kept:  # survival: no validation set (paper 3.3)
        return {}
    best = next(r for r in records if r["epoch"] == kept[-1])
    return {"best_epoch": best["epoch"], "val_f1": best["val_f1"], "val_auc": best["val_auc"]}


def parse_override(text: str) -> tuple[str, object]:
    """``key=value`` with a JSON value (``flip=true``, ``epochs=12``, ``zoom_range=[0.9,1.1]``,
    ``synthetic.n_patients=80``)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    if "." in key and not key.startswith("synthetic."):
        raise argparse.ArgumentTypeError(f"only synthetic.FIELD keys may be dotted, got {key!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value  # a bare string: optimizer=adam
    return key, tuple(parsed) if isinstance(parsed, list) else parsed


def _mean(values):
    """Mean of the defined values (None or NaN: a metric without its denominator)."""
    values = _defined(values)
    return sum(values) / len(values) if values else None


def _defined(values) -> list[float]:
    return [v for v in values if v is not None and not math.isnan(v)]


def summarize(rows: list[dict]) -> dict:
    """Mean, minimum and maximum test F1 and AUC per network over the splits where they are
    defined (a split without a test positive has none); ``f1_undefined`` counts the others."""
    summary = {}
    for name in dict.fromkeys(r["name"] for r in rows):
        mine = [r for r in rows if r["name"] == name]
        f1 = _defined(r["f1"] for r in mine)
        f1_mean = _mean(f1)
        summary[name] = {
            "splits": len(mine),
            "f1_undefined": len(mine) - len(f1),
            "f1_mean": f1_mean,
            "f1_min": min(f1, default=None),
            "f1_max": max(f1, default=None),
            "auc_mean": _mean([r["auc"] for r in mine]),
            "val_f1_mean": _mean([r.get("val_f1") for r in mine]),
            "scan_f1_mean": _mean([r.get("scan_f1") for r in mine]),
            "scan_auc_mean": _mean([r.get("scan_auc") for r in mine]),
            "target_f1": TARGET_F1.get(name),
            "mean_meets_target": f1_mean is not None and f1_mean >= TARGET_F1.get(name, 0.0),
        }
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--tasks", nargs="+", default=["signs", "disease"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--axis", default="axial")
    parser.add_argument("--preset", default="quick", choices=("quick", "tiny", "paper"))
    parser.add_argument("--data-dir", type=Path, default=Path("runs/data"))
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="folder of the runs (default: runs/bench_learning/<UTC time>, new each time)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="finish runs an interrupted benchmark left in --workdir (otherwise refused)",
    )
    parser.add_argument(
        "--override",
        nargs="*",
        type=parse_override,
        default=[],
        metavar="KEY=VALUE",
        help="TrainConfig fields to change on top of the preset, e.g. flip=true epochs=12 "
        "synthetic.n_patients=80",
    )
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/)")
    args = parser.parse_args(argv)
    args.override = dict(args.override)
    if args.workdir is None:
        args.workdir = Path("runs/bench_learning") / time.strftime("%Y%m%dT%H%M%S", time.gmtime())

    rows = []
    for task in args.tasks:
        for seed in args.seeds:
            split_rows = run_split(task, seed, args)
            rows += split_rows
            for row in split_rows:
                scan = f"F1 {format_score(row['scan_f1'])} AUC {format_score(row['scan_auc'])}"
                print(
                    f"[{row['name']} seed {seed}] F1 {format_score(row['f1'])} "
                    f"AUC {format_score(row['auc'])}; "
                    f"per scan {scan}"
                )
    summary = summarize(rows)
    for name, s in summary.items():
        print(
            f"{name}: F1 mean {format_score(s['f1_mean'])} (min {format_score(s['f1_min'])}, "
            f"max {format_score(s['f1_max'])}) over {s['splits'] - s['f1_undefined']} of "
            f"{s['splits']} splits, AUC mean {format_score(s['auc_mean'])}; per scan F1 mean "
            f"{format_score(s['scan_f1_mean'])}, AUC mean {format_score(s['scan_auc_mean'])}"
        )
    record = {
        "benchmark": "learning",
        "preset": args.preset,
        "axis": args.axis,
        "seeds": args.seeds,
        "overrides": args.override,
        "runs": rows,
        "summary": summary,
    }
    variant = "".join(f"_{k}-{v}" for k, v in args.override.items()).replace(" ", "")
    path = write_json(record, f"learning_{args.preset}_{args.axis}{variant}", args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
