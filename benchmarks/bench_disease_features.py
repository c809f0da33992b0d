"""How far simple image statistics get on a disease run's data: a baseline next to the network.

The disease task (paper 3.1) sees one gray whole-scan image per rotated scan (conservative mask).
For each given disease workdir this fits a logistic regression on hand-made statistics of those
images, on the run's training samples, and scores it like the run's report: on the test samples
as the run gathered them (balanced by undersampling), threshold 0.5. Two feature sets:

- ``global``: how much of the lung is dark (air pulls an in-lung mean toward 0: cavities,
  emphysema), low quantiles, the lung's area in the image;
- ``local``: dark spots against their surroundings (image minus its 9x9 median inside the lung,
  two pixels off its edge): the most negative residuals and how many pixels fall below -0.1..-0.25.

A high score would say the images carry the label and the network fails to find it; a low one
that the images hardly carry it. No timings.

    python benchmarks/bench_learning.py --task disease --seeds 0 1 2 --workdir W
    python benchmarks/bench_disease_features.py W/disease-axial-seed0 W/disease-axial-seed1 ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json  # noqa: E402

from sapsam_jax.data import ProjectionCache  # noqa: E402
from sapsam_jax.train import TrainConfig  # noqa: E402
from sapsam_jax.train._loop import load_run_data  # noqa: E402
from sapsam_jax.train._metrics import binary_metrics  # noqa: E402
from sapsam_jax.train._model import manifest_study_ids  # noqa: E402

DARK_LEVELS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25)  # fractions of the gray window
SPOT_LEVELS = (-0.1, -0.15, -0.2, -0.25)


def global_features(image: np.ndarray) -> list[float]:
    lung = image[image > 0]  # 0: no lung on the ray
    if lung.size == 0:
        return [0.0] * (len(DARK_LEVELS) + 4)
    dark = [float((lung < level).mean()) for level in DARK_LEVELS]
    return dark + list(np.quantile(lung, [0.001, 0.01, 0.05])) + [lung.size / image.size]


def local_features(image: np.ndarray) -> list[float]:
    inner = ndi.binary_erosion(image > 0, iterations=2)
    residual = (image - ndi.median_filter(image, size=9))[inner]
    if residual.size == 0:
        return [0.0] * (3 + len(SPOT_LEVELS))
    spots = [float((residual < level).sum()) for level in SPOT_LEVELS]
    return [float(residual.min()), *np.quantile(residual, [0.001, 0.005])] + spots


FEATURES = {"global": global_features, "local": local_features}


def run_images(workdir: Path):
    """(config, {set: (images, labels)}) of a disease run: its training and test samples as the
    run itself gathered them (load_run_data: its split, evaluation rotations and balancing; the
    test set balanced by undersampling, as the report scores it)."""
    cfg = TrainConfig.from_dict(json.loads((workdir / "config.json").read_text()))
    if cfg.task != "disease":
        raise SystemExit(f"error: {workdir} is a {cfg.task} run, not a disease run")
    cache = ProjectionCache(cfg.cache, studies=manifest_study_ids(cfg))
    data = load_run_data(cfg, cache, workdir)
    return cfg, {
        name: (np.asarray(samples.images[..., 0], np.float32), np.asarray(samples.labels))
        for name, samples in (("train", data.train), ("test", data.test))
    }


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, steps: int = 3000):
    """L2 logistic regression by gradient descent on standardised x (the run's training samples
    are class-balanced already, by its train_balance)."""
    w, b = np.zeros(x.shape[1]), 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(x @ w + b)))
        g = (p - y) / len(y)
        w -= 0.5 * (x.T @ g + l2 * w)
        b -= 0.5 * g.sum()
    return w, b


def score(sets, featurize) -> dict:
    x_train = np.array([featurize(image) for image in sets["train"][0]])
    x_test = np.array([featurize(image) for image in sets["test"][0]])
    mean, std = x_train.mean(0), x_train.std(0) + 1e-9
    w, b = fit_logistic((x_train - mean) / std, sets["train"][1])
    prob = 1.0 / (1.0 + np.exp(-(((x_test - mean) / std) @ w + b)))
    metrics = binary_metrics(sets["test"][1], prob)
    return {k: round(100 * float(metrics[k]), 1) for k in ("precision", "recall", "f1", "auc")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", type=Path, help="disease training workdirs")
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/)")
    args = parser.parse_args(argv)
    runs = []
    for workdir in args.workdirs:
        cfg, sets = run_images(workdir)
        row = {"workdir": str(workdir), "seed": cfg.seed, "axis": cfg.axis}
        row.update({name: score(sets, fn) for name, fn in FEATURES.items()})
        runs.append(row)
        print(json.dumps(row))
    means = {
        name: {k: round(statistics.mean(r[name][k] for r in runs), 1) for k in ("f1", "auc")}
        for name in FEATURES
    }
    print("means", json.dumps(means))
    path = write_json(
        {"benchmark": "disease_features", "runs": runs, "means": means},
        "disease_features",
        args.out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
