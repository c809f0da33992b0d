"""Per-run figures: learning curves, ROC curve and confusion matrix (PNG, matplotlib Agg)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sapsam_jax.config import SIGNS  # noqa: E402
from sapsam_jax.io._volume import atomic_path  # noqa: E402
from sapsam_jax.train import confusion, roc_auc, roc_curve  # noqa: E402
from sapsam_jax.train._metrics import format_score  # noqa: E402


def write_run_figures(run_dir: Path) -> list[Path]:
    """learning_curves.png, roc.png and confusion.png in ``run_dir`` (multi-label runs:
    roc_<sign>.png and confusion_<sign>.png)."""
    run_dir = Path(run_dir)
    written = []
    records = _read_metrics(run_dir / "metrics.jsonl")
    if records:
        written.append(_save(_learning_curves(records), run_dir / "learning_curves.png"))
    pred = np.load(run_dir / "predictions_test.npz")
    labels, probs = pred["labels"], pred["probs"]
    if labels.ndim == 1:
        written.append(_save(_roc_figure(labels, probs), run_dir / "roc.png"))
        written.append(_save(_confusion_figure(labels, probs), run_dir / "confusion.png"))
        return written
    for k, sign in enumerate(SIGNS):  # multi-label run: one output, one of each, per sign
        written.append(_save(_roc_figure(labels[:, k], probs[:, k]), run_dir / f"roc_{sign}.png"))
        confusion_png = run_dir / f"confusion_{sign}.png"
        written.append(_save(_confusion_figure(labels[:, k], probs[:, k]), confusion_png))
    return written


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # Undefined metrics are null in the file; NaN is what a plot leaves out.
    return [{k: float("nan") if v is None else v for k, v in r.items()} for r in records]


def _learning_curves(records: list[dict]):
    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_f1) = plt.subplots(1, 2, figsize=(9, 3.5))
    for prefix, style in (("train", "-"), ("val", "--")):
        if f"{prefix}_loss" in records[0]:
            ax_loss.plot(epochs, [r[f"{prefix}_loss"] for r in records], style, label=prefix)
            ax_f1.plot(epochs, [r[f"{prefix}_f1"] for r in records], style, label=prefix)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_f1.set(xlabel="epoch", ylabel="F1", title="F1", ylim=(0, 1.02))
    ax_loss.legend()
    ax_f1.legend()
    fig.tight_layout()
    return fig


def _roc_figure(labels, probs):
    fpr, tpr = roc_curve(labels, probs)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, label=f"AUC {format_score(roc_auc(labels, probs))}")  # n/a: one class
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="test ROC")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def _confusion_figure(labels, probs):
    c = confusion(labels, probs >= 0.5)
    matrix = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.imshow(matrix, cmap="Blues")
    for (r, col), value in np.ndenumerate(matrix):
        ax.text(col, r, str(value), ha="center", va="center")
    ax.set(
        xticks=[0, 1],
        yticks=[0, 1],
        xticklabels=["pred 0", "pred 1"],
        yticklabels=["true 0", "true 1"],
        title="test confusion",
    )
    fig.tight_layout()
    return fig


def _save(fig, path: Path) -> Path:
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path
