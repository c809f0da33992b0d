"""Per-study sign rates of the synthetic cohort against the paper's Table 1, pre-existing
condition rates against paper 1.1 and 2-year mortality against paper 3.3: a design check.

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
from sapsam_jax.data.synthetic._cohort import _plan_cohort, _plan_patient, _survival  # noqa: E402
from sapsam_jax.data.synthetic._grid import DEFAULT_SHAPE  # noqa: E402
from sapsam_jax.data.synthetic._lesions import (  # noqa: E402
    CONFOUNDER_RATES,
    CONFOUNDERS,
    fungus_ball_geometry,
    table1_rates,
)

# Paper 3.3: 43 of the 143 CPA subjects of the survival study died within two years.
PAPER_DIED_2Y = 43 / 143


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
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--patients", type=int, default=300)
    parser.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    args = parser.parse_args(argv)

    counts = {sign: dict.fromkeys(SUBREGIONS, 0) for sign in SIGNS}
    conditions = dict.fromkeys(CONFOUNDERS, 0)
    studies = died = 0
    for index, _, n_scans in _plan_cohort(args.patients, (1, 3), 0.0, args.seed):
        grid, rng, _, lesions = _plan_patient(index, True, n_scans, args.shape, None, args.seed)
        died += _survival(lesions, rng) == 0  # the patient's next draw, as generate_patient
        kinds = {lesion.kind for lesion in lesions}
        for scan in range(n_scans):
            studies += 1
            for sign, region in visible_signs(lesions, scan, n_scans, grid):
                counts[sign][region] += 1
            for kind in kinds & conditions.keys():  # pre-existing: in every scan
                conditions[kind] += 1
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
    preexisting = {
        kind: {"paper": CONFOUNDER_RATES[kind], "generated": conditions[kind] / studies}
        for kind in CONFOUNDERS
    }
    for kind, rate in preexisting.items():
        print(f"  {kind}: {100 * rate['paper']:.1f} / {100 * rate['generated']:.1f}")
    mortality = {"paper": PAPER_DIED_2Y, "generated": died / args.patients}
    print(
        f"died within 2 years: paper {100 * PAPER_DIED_2Y:.1f} % / generated "
        f"{100 * mortality['generated']:.1f} % of {args.patients} CPA patients"
    )
    record = {
        "benchmark": "cohort_rates",
        "patients": args.patients,
        "studies": studies,
        "shape": list(args.shape),
        "seed": args.seed,
        "rates": rates,
        "preexisting_per_study": preexisting,
        "died_within_2y_per_patient": mortality,
    }
    path = write_json(record, "cohort_rates", args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
