"""What one synthetic lesion adds to the projections a network sees: a design check of the cohort.

For CPA patients drawn like the built-in cohort's, each lesion is rendered alone into the
lesion-free scan (same anatomy, same noise: ``lesion_twins``), both scans are preprocessed with
one lung box (paper 2.1-2.3, the preset's grid, unrotated), and the difference is measured in the
whole-scan gray image (conservative mask: the disease task) and in the six sub-region HU-band
images (refined mask: the sign task). The lesion-free gray image's texture inside the lungs
(vessels, airways) is what a lesion has to stand out against. No timings.

    python benchmarks/bench_lesion_contrast.py                    # 12 patients, quick grid
    python benchmarks/bench_lesion_contrast.py --patients 4 --axis coronal
    python benchmarks/bench_lesion_contrast.py --per-study        # the quick disease cohort

``--per-study`` measures what the disease task has to see: every scan of every CPA patient of the
quick disease cohort (the same draw as ``scripts/train.py --task disease``), with all its lesions
against its lesion-free twin, in the whole-scan gray image.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json  # noqa: E402

from sapsam_jax.config import AXES, PREPROCESS_PRESETS  # noqa: E402
from sapsam_jax.data.synthetic import cohort_plan, lesion_twins, scan_twins  # noqa: E402
from sapsam_jax.preprocess import (  # noqa: E402
    average_projection,
    lung_bbox,
    lung_masks,
    resample_to_grid,
    subregion_band_projections,
)
from sapsam_jax.train import preset_config  # noqa: E402

VISIBLE = 0.05  # an image change of 5% of the window (25 HU in the gray window) counts as seen
BANDS = ("air", "lung", "soft")


def project(hu, spacing, preset, axis, bbox=None):
    """(bbox, gray image, the six sub-region band images) of one scan, unrotated."""
    geometry = preset.geometry
    masks = lung_masks(hu, spacing, config=preset.segmentation, backend="cpu")
    if bbox is None:
        bbox = lung_bbox(masks["refined"], spacing, geometry.bbox_margin_mm)
    work = resample_to_grid(hu.astype(np.float32), spacing, bbox, geometry, order=1)[0]
    conservative = resample_to_grid(masks["conservative"], spacing, bbox, geometry)[0]
    refined = resample_to_grid(masks["refined"], spacing, bbox, geometry)[0]
    gray = average_projection(work, conservative, axis, preset.projection.gray_window_hu)
    bands = subregion_band_projections(work, refined, axis, preset.projection.bands)
    return bbox, gray, bands


def lesion_row(kind, lesion, gray, gray0, bands, bands0) -> dict:
    diff = gray - gray0
    seen = np.abs(diff) > VISIBLE
    row = {
        "kind": kind,
        "region": lesion.region,
        "radius_mm": round(float(lesion.size), 1),
        "gray_max_abs": float(np.abs(diff).max()),
        "gray_pixels_seen": int(seen.sum()),
        "gray_mean_change_seen": float(diff[seen].mean()) if seen.any() else 0.0,
    }
    for c, name in enumerate(BANDS):
        band_diff = np.abs(bands[..., c] - bands0[..., c])
        row[f"{name}_band_max_abs"] = float(band_diff.max())
        row[f"{name}_band_pixels_seen"] = int((band_diff > VISIBLE).sum())
    return row


def measure_patient(index, args, preset, shape, spacing) -> tuple[list[dict], dict]:
    hu0, twins = lesion_twins(
        index, n_scans=args.scans, shape=shape, spacing=spacing, seed=args.seed
    )
    bbox, gray0, bands0 = project(hu0, spacing, preset, args.axis)
    lungs = gray0 > 0
    reference = {
        "patient": index,
        "lung_pixels": int(lungs.sum()),
        # What a lesion must stand out against: vessel and airway texture of the same image.
        "gray_texture_std": float(gray0[lungs].std()),
    }
    rows = []
    for lesion, hu in twins:
        kind = lesion.kind + ("+fungus_ball" if "ball_onset" in lesion.params else "")
        _, gray, bands = project(hu, spacing, preset, args.axis, bbox)
        rows.append({"patient": index} | lesion_row(kind, lesion, gray, gray0, bands, bands0))
    return rows, reference


def study_row(index: int, n_scans: int, scan: int, args, preset, shape, spacing) -> dict:
    """One CPA scan with all its lesions against its lesion-free twin, in the gray image."""
    hu0, hu1, shown = scan_twins(
        index, n_scans=n_scans, scan=scan, shape=shape, spacing=spacing, seed=args.seed
    )
    bbox, gray0, _ = project(hu0, spacing, preset, args.axis)
    _, gray1, _ = project(hu1, spacing, preset, args.axis, bbox)
    change = np.abs(gray1 - gray0)
    lungs = gray0 > 0
    return {
        "patient": index,
        "scan": scan + 1,
        "lesions": sorted(lesion.kind for lesion in shown),
        "gray_max_abs": float(change.max()),
        "gray_pixels_over_0.05": int((change > VISIBLE).sum()),
        "gray_pixels_over_0.10": int((change > 2 * VISIBLE).sum()),
        "gray_texture_std": float(gray0[lungs].std()),
        "lung_pixels": int(lungs.sum()),
    }


def per_study(args) -> int:
    """Every CPA scan of the quick disease cohort: how much of it the gray image shows."""
    train_cfg = preset_config(args.preset, "disease")
    preset = PREPROCESS_PRESETS[train_cfg.preprocess_preset]
    syn = train_cfg.synthetic
    args.seed = syn.seed  # the cohort training draws (its own seed, not --seed)
    plan = cohort_plan(syn.n_patients, control_fraction=syn.control_fraction, seed=args.seed)
    rows = []
    for index, cpa, n_scans in plan:
        if not cpa:
            continue
        for scan in range(n_scans):
            row = study_row(index, n_scans, scan, args, preset, syn.shape, syn.spacing)
            rows.append(row)
            print(
                f"patient {index} scan {row['scan']}: max change {row['gray_max_abs']:.2f}, "
                f"{row['gray_pixels_over_0.10']} pixels > 0.10 (texture std "
                f"{row['gray_texture_std']:.3f}; {', '.join(row['lesions'])})",
                flush=True,
            )
    # A scan whose lesions move no pixel by more than the lungs' own texture std looks like a
    # control scan to anything that reads single pixels (or their neighbourhood) of this image.
    faint = [r for r in rows if r["gray_max_abs"] <= r["gray_texture_std"]]
    print(
        f"{len(faint)} of {len(rows)} CPA scans ({len(faint) / max(len(rows), 1):.0%}) change no "
        "gray pixel by more than the lungs' texture std"
    )
    record = {
        "benchmark": "lesion_contrast_per_study",
        "preset": args.preset,
        "axis": args.axis,
        "seed": args.seed,
        "cohort": {"n_patients": syn.n_patients, "control_fraction": syn.control_fraction},
        "cpa_scans": len(rows),
        "faint_scans": len(faint),
        "faint_patients": sorted({r["patient"] for r in faint}),
        "studies": rows,
    }
    path = write_json(record, f"lesion_contrast_per_study_{args.preset}_{args.axis}", args.out)
    print(f"wrote {path}")
    return 0


def summarize(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if k.endswith(("_max_abs", "_seen"))] if rows else []
    by_kind = defaultdict(list)
    for row in rows:
        by_kind[row["kind"]].append(row)
    return {
        kind: {"lesions": len(mine)} | {k: statistics.median(r[k] for r in mine) for k in keys}
        for kind, mine in sorted(by_kind.items())
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=12, help="CPA patients 0..N-1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scans", type=int, default=3, help="longitudinal scans; the last is used")
    parser.add_argument("--preset", default="quick", choices=("quick", "tiny", "paper"))
    parser.add_argument("--axis", default="axial", choices=tuple(AXES))
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/)")
    parser.add_argument(
        "--per-study",
        action="store_true",
        help="every CPA scan of the preset's disease cohort, all lesions at once (disease task)",
    )
    args = parser.parse_args(argv)
    if args.patients < 1 or args.scans < 1:
        parser.error("--patients and --scans must be at least 1")
    if args.per_study:
        return per_study(args)

    train_cfg = preset_config(args.preset, "signs")
    preset = PREPROCESS_PRESETS[train_cfg.preprocess_preset]
    shape, spacing = train_cfg.synthetic.shape, train_cfg.synthetic.spacing
    rows, references = [], []
    for index in range(args.patients):
        patient_rows, reference = measure_patient(index, args, preset, shape, spacing)
        rows += patient_rows
        references.append(reference)
        print(f"patient {index}: {', '.join(r['kind'] for r in patient_rows)}", flush=True)
    summary = summarize(rows)
    texture = statistics.median(r["gray_texture_std"] for r in references)
    lung_pixels = statistics.median(r["lung_pixels"] for r in references)
    print(f"lesion-free gray image: {lung_pixels:.0f} lung pixels, texture std {texture:.3f}")
    print("medians per kind: max |change| (pixels changed by > 0.05)")
    for kind, s in summary.items():
        bands = " ".join(
            f"{b} {s[f'{b}_band_max_abs']:.2f} ({s[f'{b}_band_pixels_seen']:.0f})" for b in BANDS
        )
        print(
            f"  {kind:28s} n={s['lesions']:2d}  gray {s['gray_max_abs']:.2f} "
            f"({s['gray_pixels_seen']:.0f})  bands: {bands}"
        )
    record = {
        "benchmark": "lesion_contrast",
        "preset": args.preset,
        "axis": args.axis,
        "seed": args.seed,
        "visible_threshold": VISIBLE,
        "gray_texture_std_median": texture,
        "lung_pixels_median": lung_pixels,
        "summary_median": summary,
        "references": references,
        "lesions": rows,
    }
    path = write_json(record, f"lesion_contrast_{args.preset}_{args.axis}", args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
