"""Per-study sign rates of the synthetic cohort against the paper's Table 1: a design check.

Table 1 counts CPA *studies* with each sign per sub-region; the generator draws each sign once per
CPA patient at that rate, and onsets (a sign, or a fungus ball in its cavity, appearing in a later
scan) then remove it from earlier scans. This plans CPA patients exactly as ``make_cohort`` does
(scan counts from its cohort plan, lesions from ``_plan_patient``) and counts, per study, the
signs visible at that scan -- the flags ``annotations_from_labels`` reads off the painted label
maps. No images are painted, so it is quick: about 1 s per patient on the default grid. No timings.

    python benchmarks/bench_cohort_rates.py                   # 300 patients, default grid
    python benchmarks/bench_cohort_rates.py --patients 60 --shape 80 128 128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json  # noqa: E402

from sapsam_jax.config import SIGNS, SUBREGIONS  # noqa: E402
from sapsam_jax.data.synthetic._cohort import _plan_cohort, _plan_patient  # noqa: E402
from sapsam_jax.data.synthetic._grid import DEFAULT_SHAPE  # noqa: E402
from sapsam_jax.data.synthetic._lesions import fungus_ball_geometry, table1_rates  # noqa: E402


def visible_signs(lesions, scan: int, n_scans: int, grid) -> set[tuple[str, str]]:
    """(sign, sub-region) pairs a scan shows: what its annotation flags will say."""
    seen = set()
    for lesion in lesions:
        scale = lesion.scale(scan, n_scans)
        if scale <= 0 or lesion.kind not in ("cavity", "pleural_thickening"):
            continue
        seen.add((lesion.kind, lesion.region))
        ball = "ball_fraction" in lesion.params and scan >= lesion.params["ball_onset"]
        if ball and fungus_ball_geometry(lesion.params, lesion.size * scale, grid) is not None:
            seen.add(("fungus_ball", lesion.region))
    return seen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=300)
    parser.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    args = parser.parse_args(argv)

    counts = {sign: dict.fromkeys(SUBREGIONS, 0) for sign in SIGNS}
    studies = 0
    for index, _, n_scans in _plan_cohort(args.patients, (1, 3), 0.0, args.seed):
        grid, _, _, lesions = _plan_patient(index, True, n_scans, args.shape, None, args.seed)
        for scan in range(n_scans):
            studies += 1
            for sign, region in visible_signs(lesions, scan, n_scans, grid):
                counts[sign][region] += 1
    table1 = table1_rates()
    rates = {
        sign: {
            region: {"table1": table1[sign][region], "generated": counts[sign][region] / studies}
            for region in SUBREGIONS
        }
        for sign in SIGNS
    }
    print(f"{studies} studies of {args.patients} CPA patients; % of studies, Table 1 / generated")
    for region in SUBREGIONS:
        cells = "  ".join(
            f"{sign} {100 * rates[sign][region]['table1']:5.1f} / "
            f"{100 * rates[sign][region]['generated']:5.1f}"
            for sign in SIGNS
        )
        print(f"  {region:13s} {cells}")
    record = {
        "benchmark": "cohort_rates",
        "patients": args.patients,
        "studies": studies,
        "shape": list(args.shape),
        "seed": args.seed,
        "rates": rates,
    }
    path = write_json(record, "cohort_rates", args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
