"""The whole job of ``scripts/train.py``: train, then report (paper 3.1-3.3 Table 2 layout) and,
where the cohort carries lesion truth (the synthetic one), localisation scores of the sign maps.

It sits above the stages it chains (train -> evaluate, explain), so none of them imports a later
one::

    from sapsam_jax.job import train_and_report
    from sapsam_jax.train import preset_config

    results = train_and_report(preset_config("quick", "signs").replace(axis="axial"))
"""

from __future__ import annotations

from sapsam_jax.evaluate import find_trained_runs, write_report
from sapsam_jax.explain import localisation_report
from sapsam_jax.train import TrainConfig, train
from sapsam_jax.train._distributed import is_primary


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


__all__ = ["train_and_report"]
