"""Binary classification metrics as the paper reports them (precision, recall, F1; 3.1-3.3) plus
accuracy and ROC AUC, with percentile-bootstrap 95% intervals (resampled over test images, or
over groups of them such as patients: the report resamples patients, ``groups=patient_ids``)."""

from __future__ import annotations

import numpy as np

METRIC_NAMES = ("accuracy", "precision", "recall", "f1", "auc")


def confusion(y_true, y_pred) -> dict[str, int]:
    """True/false positives/negatives of binary labels."""
    y_true, y_pred = np.asarray(y_true).astype(bool), np.asarray(y_pred).astype(bool)
    return {
        "tp": int(np.sum(y_true & y_pred)),
        "fp": int(np.sum(~y_true & y_pred)),
        "fn": int(np.sum(y_true & ~y_pred)),
        "tn": int(np.sum(~y_true & ~y_pred)),
    }


def roc_auc(y_true, scores) -> float:
    """Area under the ROC curve by the rank statistic (ties count half); NaN for a single class."""
    y_true, scores = np.asarray(y_true).astype(bool), np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y_true.sum()), int((~y_true).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    # Average the ranks of tied scores so ties contribute 1/2 (Mann-Whitney U).
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    ranks = (sums / counts)[inverse]
    return float((ranks[y_true].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct threshold, from (0, 0) to (1, 1).

    Tied scores are one threshold: one diagonal step, so the area under the drawn curve is
    :func:`roc_auc` (ties count 1/2), as in scikit-learn.
    """
    y_true = np.asarray(y_true).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="mergesort")
    ranked = scores[order]
    last_of_each_score = np.r_[ranked[1:] != ranked[:-1], True] if len(ranked) else []
    tps = np.concatenate([[0], np.cumsum(y_true[order])[last_of_each_score]])
    fps = np.concatenate([[0], np.cumsum(~y_true[order])[last_of_each_score]])
    return fps / max(fps[-1], 1), tps / max(tps[-1], 1)


def binary_metrics(y_true, scores, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (at ``threshold`` on P(positive)) and ROC AUC.

    A metric whose denominator is empty is NaN, not 0: precision without predicted positives,
    recall without positives, F1 without either. A sign no test patient has is "n/a" in the
    report, and a bootstrap resample without positives leaves the recall interval alone instead
    of pulling it to 0.
    """
    y_true = np.asarray(y_true).astype(bool)
    counts = confusion(y_true, np.asarray(scores) >= threshold)
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)  # = 2 P R / (P + R) where both are defined
    return {
        "accuracy": _ratio(tp + counts["tn"], len(y_true)),  # no samples: NaN, not 0 %
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "auc": roc_auc(y_true, scores),
        "n": int(len(y_true)),
        "n_positive": int(y_true.sum()),
    }


def format_score(value, spec: str = ".3f") -> str:
    """A score for a log line or a table cell: "n/a" where it is undefined (None or NaN, see
    :func:`binary_metrics`), as the report writes it, instead of Python's "nan"."""
    if value is None or not np.isfinite(value):
        return "n/a"
    return format(value, spec)


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else float("nan")


def bootstrap_intervals(
    y_true,
    scores,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    groups=None,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of every metric in METRIC_NAMES.

    ``groups`` (e.g. the patient of each image) makes it a cluster bootstrap: whole groups are
    drawn with replacement. The images of one patient (its scans, 27 rotations, 6 sub-regions)
    are far from independent, so resampling single images gives intervals that are too narrow.
    """
    y_true, scores = np.asarray(y_true), np.asarray(scores)
    rng = np.random.default_rng(seed)
    members = _group_members(groups, len(y_true))
    draws = {name: [] for name in METRIC_NAMES}
    for _ in range(n_resamples):
        if members is None:
            idx = rng.integers(0, len(y_true), len(y_true))
        else:
            drawn = rng.integers(0, len(members), len(members))
            idx = np.concatenate([members[i] for i in drawn])
        values = binary_metrics(y_true[idx], scores[idx])
        for name in METRIC_NAMES:
            draws[name].append(values[name])
    tail = (1 - level) / 2 * 100
    return {name: _interval(np.asarray(vals), tail) for name, vals in draws.items()}


def _interval(values: np.ndarray, tail: float) -> tuple[float, float]:
    """Percentile interval of the resamples where the metric is defined (NaN if none is)."""
    values = values[~np.isnan(values)]
    if values.size == 0:
        return (float("nan"), float("nan"))
    return tuple(float(v) for v in np.percentile(values, [tail, 100 - tail]))


def _group_members(groups, n: int) -> list[np.ndarray] | None:
    """Index arrays of each group, in order of first sorted group id (None without groups)."""
    if groups is None:
        return None
    groups = np.asarray(groups)
    if len(groups) != n:
        raise ValueError(f"{len(groups)} groups for {n} samples")
    _, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1)
