"""Learning and localisation checks on the synthetic cohort with the quick preset. Slow: about 10-20
minutes on 2 CPU cores, so it is deselected by default; run it with `python -m pytest -m slow`."""

import pytest

from sapsam_jax.config import SIGNS
from sapsam_jax.train import preset_config, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("learning") / "data"


def test_quick_preset_learns_every_sign_on_axial_projections(data_dir):
    cfg = preset_config("quick", "signs").replace(
        axis="axial", sign="all", data_dir=str(data_dir), workdir=str(data_dir.parent / "signs")
    )
    results = train(cfg, log=print)
    for sign in SIGNS:
        assert results[sign]["f1"] >= 0.85, (sign, results[sign])


def test_quick_preset_learns_the_disease_task(data_dir):
    cfg = preset_config("quick", "disease").replace(
        axis="axial", data_dir=str(data_dir), workdir=str(data_dir.parent / "disease")
    )
    results = train(cfg, log=print)
    assert results["disease"]["f1"] >= 0.9, results["disease"]


def test_quick_preset_maps_point_at_cavities_and_fungus_balls(data_dir):
    from sapsam_jax.evaluate import find_trained_runs
    from sapsam_jax.explain import localisation_report

    workdir = data_dir.parent / "signs"
    if not find_trained_runs([workdir]):  # run alone: train the sign networks first
        cfg = preset_config("quick", "signs").replace(
            axis="axial", sign="all", data_dir=str(data_dir), workdir=str(workdir)
        )
        train(cfg, log=print)
    rows = {r["sign"]: r for r in localisation_report(find_trained_runs([workdir]))}
    for sign in ("cavity", "fungus_ball"):  # issue 6 target: pointing game >= 0.8 (axial)
        assert rows[sign]["n"] >= 5 and rows[sign]["pointing_game"] >= 0.8, rows[sign]
