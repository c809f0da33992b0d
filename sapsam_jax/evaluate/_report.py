"""Test reports laid out like the paper's Table 2, with bootstrap intervals and figures.

``write_report(workdirs, out_dir)`` collects every training run below the given workdirs (each
holds ``config.json`` and ``predictions_test.npz``) into ``report.md`` / ``report.json``: one
row per task or sign, one column group per metric with the axial | coronal | sagittal
values (paper 3.2).
"""

from __future__ import annotations

import json
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

from sapsam_jax.config import AXES
from sapsam_jax.data._cache import atomic_write_text, nonfinite_to_null
from sapsam_jax.train import METRIC_NAMES, binary_metrics, bootstrap_intervals
from sapsam_jax.train._checkpoint import saved_epochs
from sapsam_jax.train._config import TrainConfig
from sapsam_jax.train._metrics import format_score

TABLE_METRICS = ("precision", "recall", "f1", "auc")


# Bootstrap intervals over fewer test patients than this say little; the report says so.
FEW_TEST_PATIENTS = 5


class ReportError(ValueError):
    """A run folder cannot be reported (damaged config, predictions or metrics); names it."""


def find_runs(workdirs, marker: str = "predictions_test.npz") -> list[Path]:
    """Every run folder (config.json + ``marker``) at or below ``workdirs``, each once (a folder
    given twice, relative and absolute, or inside another given folder, is one run)."""
    runs = set()
    for root in (Path(w).resolve() for w in workdirs):
        for config in [root / "config.json", *root.rglob("*/config.json")]:
            if (config.parent / marker).exists():
                runs.add(config.parent)
    return sorted(runs)


def run_results(run_dir: Path) -> dict:
    """Metrics with 95% bootstrap intervals of one run's test predictions."""
    try:
        return _run_results(Path(run_dir))
    # A truncated predictions_test.npz (a copy cut short) fails in np.load with these two.
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError) as err:
        raise ReportError(f"run {run_dir}: cannot report it ({type(err).__name__}: {err})") from err


def _run_results(run_dir: Path) -> dict:
    cfg = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    pred = np.load(run_dir / "predictions_test.npz", allow_pickle=False)
    labels, probs = pred["labels"], pred["probs"]
    # Patient-level intervals (paper 2.3 splits by patient); older files lack the ids.
    patients = pred["patient_ids"] if "patient_ids" in pred.files else None
    n_patients = len(set(patients.tolist())) if patients is not None else None
    epochs = checkpoint_epochs(run_dir, cfg)
    names = _row_names(cfg, labels)
    scans = per_scan(pred) if "study_ids" in pred.files and patients is not None else None
    results = []
    for column, name in enumerate(names):
        row = {
            "row": name,
            "axis": cfg.axis,
            "task": cfg.task,
            "workdir": str(run_dir),
            **_scores(labels, probs, column, patients, cfg),
            "ci_resamples": "patients" if patients is not None else "images",
            "n_test_patients": n_patients,
            "epochs": epochs,
            "setup": run_setup(cfg),
        }
        if scans is not None:
            scan_labels, scan_probs, scan_patients = scans
            row["per_scan"] = _scores(scan_labels, scan_probs, column, scan_patients, cfg)
        results.append(row)
    return {"run": str(run_dir), "rows": results}


def _scores(labels, probs, column: int, patients, cfg: TrainConfig) -> dict:
    """Metrics and patient-resampled intervals of one output column."""
    y = labels if labels.ndim == 1 else labels[:, column]
    p = probs if probs.ndim == 1 else probs[:, column]
    return {
        "metrics": binary_metrics(y, p),
        "ci95": bootstrap_intervals(
            y, p, n_resamples=cfg.bootstrap, seed=cfg.seed, groups=patients
        ),
    }


def per_scan(pred) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, probabilities, patients) with one entry per test scan (sign tasks: per scan
    sub-region): the mean probability over the scan's rotated projections.

    The paper scores projections (3.1: "N=822 axial projections"); a user diagnosing a scan
    wants one call for it, and averaging the 27 rotations (paper 2.3) is test-time augmentation.
    """
    columns = [pred["patient_ids"].astype(str), pred["study_ids"].astype(str)]
    if "subregions" in pred.files:
        columns.append(pred["subregions"].astype(str))
    # One row of ids per projection: numpy string concatenation drops NUL separators, so joined
    # keys collide (patient "1" + study "10" == patient "11" + study "0").
    keys = np.stack(columns, axis=1)
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    counts = np.bincount(inverse).astype(np.float64)
    labels, probs = pred["labels"], np.asarray(pred["probs"], np.float64)
    if not np.array_equal(labels, labels[first][inverse]):
        raise ValueError("the projections of one scan carry different labels")
    sums = np.zeros((len(first), *probs.shape[1:]))
    np.add.at(sums, inverse, probs)
    means = sums / counts.reshape(-1, *([1] * (probs.ndim - 1)))
    return labels[first], means, pred["patient_ids"][first]


# What a row's numbers depend on besides its task, sign and axis: a table of runs that differ in
# these (another cohort or preset, architecture, evaluation set) says so under it.
SETUP_FIELDS = (
    "preset",
    "arch",
    "width",
    "image_size",
    "weights",
    "eval_rotations",
    "test_balance",
    "select_by",
    "seed",
)


def run_setup(cfg: TrainConfig) -> dict:
    """The run's settings that make its numbers comparable, or not, to another run's."""
    setup = {name: getattr(cfg, name) for name in SETUP_FIELDS}
    # The data: the projection cache trained on (train records its absolute path; a manifest
    # path is as the user typed it), or the built-in cohort by its name.
    setup["data"] = cfg.cache or cfg.manifest or f"synthetic {cfg.synthetic.name}"
    return setup


def checkpoint_epochs(run_dir: Path, cfg: TrainConfig) -> dict:
    """Epochs the run finished (its latest checkpoint), planned, and the best checkpoint's: a
    run that was stopped early is reported as what it is."""

    def last(kind: str) -> int | None:
        return max(saved_epochs(run_dir, kind), default=None)

    return {"done": last("latest"), "planned": cfg.num_epochs, "best": last("best")}


def _incomplete(row: dict) -> bool:
    epochs = row.get("epochs") or {}
    return epochs.get("done") is not None and epochs["done"] < epochs["planned"]


def _row_names(cfg: TrainConfig, labels: np.ndarray) -> list[str]:
    from sapsam_jax.config import SIGNS

    if cfg.task != "signs":
        return [cfg.task]
    return list(SIGNS) if labels.ndim == 2 else [cfg.sign]


def write_report(workdirs, out_dir, *, extra: dict | None = None) -> dict:
    """Write report.md/report.json for all runs below ``workdirs`` and each run's figures."""
    from sapsam_jax.evaluate._figures import write_run_figures

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for run_dir in find_runs(workdirs):
        rows.extend(run_results(run_dir)["rows"])
        try:
            write_run_figures(run_dir)
        except (OSError, ValueError, KeyError) as err:
            raise ReportError(f"run {run_dir}: cannot draw its figures ({err})") from err
    report = {"rows": rows, **(extra or {})}
    text = json.dumps(nonfinite_to_null(report), indent=2, default=_json_default, allow_nan=False)
    atomic_write_text(out_dir / "report.json", text)
    atomic_write_text(out_dir / "report.md", render_markdown(report))
    return report


def render_markdown(report: dict) -> str:
    """Table 2 layout: rows = task/sign, columns = metric x (axial | coronal | sagittal)."""
    rows = _distinct_rows(report["rows"])
    names = list(dict.fromkeys(r["row"] for r in rows))
    axes = [a for a in AXES if any(r["axis"] == a for r in rows)]
    header = ["Task"] + [
        f"{m.upper() if m == 'auc' else m.capitalize()} ({a[:3]})"
        for m in TABLE_METRICS
        for a in axes
    ]
    by_images = _image_resampled_lines(rows)
    lines = [
        "# SAPSAM test report",
        "",
        "Test scores (%) on the held-out patients, with 95% bootstrap intervals that resample "
        f"patients{' (except the rows named below)' if by_images else ''} (laid out like the "
        "paper's Table 2).",
        "",
        *_table(rows, names, axes, header),
    ]
    lines += _per_scan_lines(rows, names, axes, header)
    lines += [
        "",
        "| Task | Axis | n test | positives | test patients | test scans (positive) "
        "| epochs (best) | accuracy | workdir |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["metrics"]
        patients = r.get("n_test_patients")
        lines.append(
            f"| {r['row']} | {r['axis']} | {m['n']} | {m['n_positive']} | "
            f"{'?' if patients is None else patients} | {_scans_cell(r)} | "
            f"{_epochs_cell(r.get('epochs'))} | "
            f"{100 * m['accuracy']:.1f} | `{r['workdir']}` |"
        )
    few = [
        r["row"]
        for r in rows
        if (r.get("n_test_patients") or FEW_TEST_PATIENTS) < FEW_TEST_PATIENTS
    ]
    if few:
        lines += [
            "",
            f"Fewer than {FEW_TEST_PATIENTS} test patients ({', '.join(dict.fromkeys(few))}): "
            "their intervals resample so few patients that they say little.",
        ]
    lines += by_images
    lines += _setup_lines(rows)
    if any(_incomplete(r) for r in rows):
        lines += [
            "",
            "Rows marked *incomplete* come from runs stopped before their last epoch (rerun the "
            "same command to finish them).",
        ]
    lines += _localisation_lines(report.get("localisation"))
    return "\n".join(lines) + "\n"


def _table(rows: list[dict], names, axes, header, part=None) -> list[str]:
    """Markdown rows of ``header``: one per task/sign, metric x axis cells from ``row[part]``
    (the row itself when ``part`` is None)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        cells = [name]
        for metric in TABLE_METRICS:
            for axis in axes:
                match = [r for r in rows if r["row"] == name and r["axis"] == axis]
                scores = (match[0] if part is None else match[0].get(part)) if match else None
                cells.append(_cell(scores, metric) if scores else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _per_scan_lines(rows: list[dict], names, axes, header) -> list[str]:
    """The table again with one call per scan, where a scan has several test projections."""
    if not any(r["metrics"]["n"] > r.get("per_scan", r)["metrics"]["n"] for r in rows):
        return []  # one projection per scan (eval_rotations="identity"): the same numbers
    return [
        "",
        "Per scan (sign rows: per scan sub-region): the mean probability over its rotated test "
        "projections, one call per scan (test-time augmentation; the table above scores each "
        "projection, as the paper does).",
        "",
        *_table(rows, names, axes, header, part="per_scan"),
    ]


def _setup_lines(rows: list[dict]) -> list[str]:
    """A note naming the settings in which the table's runs differ, with each value's rows."""
    differ = []
    for name in dict.fromkeys(k for r in rows for k in r.get("setup", {})):
        by_value: dict[str, list[str]] = {}
        for r in rows:
            if name in r.get("setup", {}):
                by_value.setdefault(str(r["setup"][name]), []).append(f"{r['row']} {r['axis']}")
        if len(by_value) > 1:
            values = "; ".join(f"{v}: {', '.join(dict.fromkeys(w))}" for v, w in by_value.items())
            differ.append(f"- {name}: {values}")
    if not differ:
        return []
    return [
        "",
        "The runs in this table differ in these settings (compare rows with care):",
        *differ,
    ]


def _image_resampled_lines(rows: list[dict]) -> list[str]:
    """A note naming the rows whose intervals resample images, not patients (predictions saved
    before patient ids were): a patient's images are not independent, so these are too narrow."""
    names = list(dict.fromkeys(r["row"] for r in rows if r.get("ci_resamples") == "images"))
    if not names:
        return []
    return [
        "",
        f"The intervals of {', '.join(names)} resample test images, not patients, and are too "
        "narrow: their predictions were saved without patient ids (`scripts/evaluate.py` "
        "without `--no-rebuild` predicts them again, with the ids).",
    ]


def _distinct_rows(rows: list[dict]) -> list[dict]:
    """Rows with the run's folder added to the name where runs share a name and axis (two seeds,
    ``--sign all`` next to ``--sign multi``), so the table shows every run, not the first; rows
    of runs stopped early say so."""
    named = [dict(r) for r in rows]
    groups: dict[tuple, list[int]] = {}
    for index, r in enumerate(rows):
        groups.setdefault((r["row"], r["axis"]), []).append(index)
    for indices in groups.values():
        if len(indices) > 1:
            labels = distinguishing_suffixes([rows[i]["workdir"] for i in indices])
            for i, label in zip(indices, labels, strict=True):
                named[i]["row"] = f"{rows[i]['row']} ({label})"
    for r in named:
        if _incomplete(r):
            r["row"] += f" (*incomplete*: {r['epochs']['done']}/{r['epochs']['planned']} epochs)"
    return named


def distinguishing_suffixes(paths) -> list[str]:
    """The shortest trailing parts (two at least) that tell the paths apart, one per path."""
    parts = [Path(p).parts for p in paths]
    for k in range(2, max(map(len, parts)) + 1):
        labels = ["/".join(p[-k:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def _scans_cell(row: dict) -> str:
    if "per_scan" not in row:  # predictions saved without study and patient ids
        return "?"
    scans = row["per_scan"]["metrics"]
    return f"{scans['n']} ({scans['n_positive']})"


def _epochs_cell(epochs: dict | None) -> str:
    if not epochs or epochs.get("done") is None:
        return "?"
    return f"{epochs['done']}/{epochs['planned']} ({epochs['best'] if epochs['best'] else '-'})"


def _cell(row: dict, metric: str) -> str:
    value = row["metrics"][metric]
    low, high = row["ci95"][metric]
    if np.isnan(value):
        return "n/a"
    return f"{100 * value:.1f} [{100 * low:.1f}-{100 * high:.1f}]"


def _localisation_lines(scores) -> list[str]:
    if not scores:
        return []
    lines = [
        "",
        "## Localisation (synthetic lesion truth)",
        "",
        "Maps of the unrotated test scans, one per sub-region holding the sign; pointing game: the "
        "map's maximum within a few pixels of the lesion; detected: only the sub-regions the "
        "network calls positive (p >= 0.5), the maps a user is shown.",
        "",
        "| Sign | Axis | maps | method (layer) | pointing game (chance) "
        "| pointing game, detected (maps) | energy inside (chance) |",
        "|---|---|---|---|---|---|---|",
    ]
    repeated = Counter((e["sign"], e["axis"]) for e in scores)
    shared = [e for e in scores if repeated[(e["sign"], e["axis"])] > 1]
    workdirs = sorted({w for e in shared for w in e.get("workdirs") or []})
    label = dict(zip(workdirs, distinguishing_suffixes(workdirs), strict=True)) if workdirs else {}
    for entry in scores:
        how = f"{entry.get('method', '?')} ({entry.get('layer', '?')})"
        sign = entry["sign"]
        if repeated[(sign, entry["axis"])] > 1 and entry.get("workdirs"):
            # Several run sets (seeds, --sign all beside multi): name each row's runs.
            sign += " (" + ", ".join(label[w] for w in entry["workdirs"]) + ")"
        chance = entry.get("pointing_chance")
        chance = f" ({chance:.2f})" if chance is not None else ""
        # No map called positive: the detected pointing game is undefined, n/a as in Table 2.
        detected = format_score(entry.get("pointing_game_detected"), ".2f")
        lines.append(
            f"| {sign} | {entry['axis']} | {entry['n']} | {how} | "
            f"{format_score(entry['pointing_game'], '.2f')}{chance} | "
            f"{detected} ({entry.get('n_detected', 0)}) | "
            f"{format_score(entry['energy_inside'], '.2f')} ({entry['energy_chance']:.2f}) |"
        )
    return lines


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


__all__ = [
    "METRIC_NAMES",
    "ReportError",
    "checkpoint_epochs",
    "find_runs",
    "render_markdown",
    "run_results",
    "write_report",
]
