"""The whole job of ``scripts/train.py``: train, then report (paper 3.1-3.3 Table 2 layout) and,
where the cohort carries lesion truth (the synthetic one), localisation scores of the sign maps.

It sits above the stages it chains (train -> evaluate, explain), so none of them imports a later
one::

    from sapsam_jax.job import train_and_report
    from sapsam_jax.train import preset_config

    results = train_and_report(preset_config("quick", "signs").replace(axis="axial"))
"""

from __future__ import annotations

import sys

from sapsam_jax.evaluate import find_trained_runs, write_report
from sapsam_jax.explain import localisation_report
from sapsam_jax.train import TrainConfig, train
from sapsam_jax.train._distributed import is_primary
from sapsam_jax.train._metrics import format_score


def train_and_report(cfg: TrainConfig, *, log=print) -> dict:
    """Train the networks ``cfg`` describes, then write ``<workdir>/report.md`` and
    ``report.json`` (with localisation rows for sign runs with lesion truth).

    Returns :func:`sapsam_jax.train.train`'s test metrics per network.
    """
    results = train(cfg, log=log)
    if not is_primary():  # several processes: the first one writes the report
        return results
    workdir = cfg.workdir_path
    extra = None
    if cfg.task == "signs":
        rows = localisation_report(find_trained_runs([workdir]))
        extra = {"localisation": rows} if rows else None
    write_report([workdir], workdir, extra=extra)
    log(f"report: {workdir / 'report.md'}")
    return results


def main(argv=None) -> int:
    """``scripts/train.py`` (and the ``sapsam-train`` command): flags -> config -> train and
    report. Problems a user can fix are one ``error:`` line and exit status 2."""
    from sapsam_jax.data import SplitError
    from sapsam_jax.data._cache import CacheError
    from sapsam_jax.io import ManifestError
    from sapsam_jax.train._cli import parse_config
    from sapsam_jax.train._loop import BatchTooLargeError, WorkdirError

    parsed = parse_config(argv)
    if isinstance(parsed, int):
        return parsed
    cfg, reason = parsed
    print(reason, flush=True)  # the first line says which preset runs, and why
    user_errors = (
        FileNotFoundError,
        FileExistsError,
        CacheError,
        ManifestError,
        WorkdirError,
        BatchTooLargeError,
    )
    try:
        results = train_and_report(cfg)
    except (*user_errors, SplitError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _interrupted()
    except Exception as err:
        # Ctrl-C inside a jitted call can surface as another error raised from the interrupt
        # (JAX: "Exception raised while checking equality of metadata fields of pytree").
        if _caused_by_interrupt(err):
            return _interrupted()
        raise
    for name, metrics in results.items():
        # --sign multi: one network, its test images of all three signs scored together.
        label = "multi (the three signs pooled; per sign in report.md)" if name == "multi" else name
        print(summary_line(label, metrics))
    return 0


def _caused_by_interrupt(err: BaseException) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def _interrupted() -> int:
    """Ctrl-C: the cohort, the cached studies and the finished epochs are kept, so the same
    command resumes (README, "Resuming"); exit status 130 like scripts/preprocess.py."""
    print(
        "interrupted; rerun the same command to resume (the cohort, cached studies and "
        "finished epochs are kept)",
        file=sys.stderr,
    )
    return 130


def summary_line(name: str, metrics: dict) -> str:
    """The test scores of one network as the command prints them; undefined ones are n/a, as
    in report.md."""
    scores = " ".join(
        f"{label} {format_score(metrics[key])}"
        for label, key in (("precision", "precision"), ("recall", "recall"), ("F1", "f1"))
    )
    return f"{name}: test {scores} AUC {format_score(metrics['auc'])} (n={metrics['n']})"


__all__ = ["main", "train_and_report"]
