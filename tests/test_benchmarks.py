"""Benchmark command lines: options that would measure the wrong thing are refused."""

import importlib.util
import sys

import pytest
from conftest import REPO_ROOT


def _load(name):
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("backends", ["auto", "GPU", "cpu,auto"])
def test_bench_preprocess_refuses_backend_names_it_cannot_time(backends, tmp_path):
    # get_backend accepts "auto" and any case, but only the name "gpu" makes the timer wait for
    # the device (a GPU run under another name timed kernel launches) and pairs with "cpu" for
    # the CPU/GPU ratio.
    bench = _load("bench_preprocess")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(
            [
                "--quick",
                "--stages",
                "resample",
                "--backends",
                backends,
                "--out",
                str(tmp_path / "out.json"),
            ]
        )
    assert exit_info.value.code == 2
    assert not (tmp_path / "out.json").exists()


def test_bench_learning_summary_skips_undefined_splits_in_any_order():
    # A split without a test positive has no F1 (NaN); min/max over a list holding NaN depended
    # on its position, and the mean was NaN.
    bench = _load("bench_learning")
    nan = float("nan")
    for f1 in ([nan, 0.5, 0.9], [0.5, 0.9, nan]):
        rows = [{"name": "cavity", "f1": v, "auc": 0.8} for v in f1]
        summary = bench.summarize(rows)["cavity"]
        assert (summary["f1_min"], summary["f1_max"]) == (0.5, 0.9)
        assert summary["f1_mean"] == pytest.approx(0.7) and summary["f1_undefined"] == 1
        assert summary["mean_meets_target"] is False  # 0.7 < 0.85
    none = bench.summarize([{"name": "cavity", "f1": nan, "auc": nan}])["cavity"]
    assert none["f1_mean"] is None and none["mean_meets_target"] is False


def test_bench_preprocess_refuses_an_unknown_case(capsys):
    bench = _load("bench_preprocess")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--cases", "quick,papr", "--backends", "cpu", "--stages", "resample"])
    assert exit_info.value.code == 2  # was a KeyError traceback
    assert "unknown cases in 'quick,papr'; choose from paper, quick" in capsys.readouterr().err


def test_bench_models_refuses_a_max_batch_below_its_first_batch(capsys, tmp_path):
    # The largest-batch search starts at the first batch (2 quick, 32 full): a lower cap timed
    # nothing and wrote a JSON without rows.
    bench = _load("bench_models")
    for cap in ("1", "0"):  # 0 fell back to the default cap
        with pytest.raises(SystemExit) as exit_info:
            bench.main(["--quick", "--max-batch", cap, "--out", str(tmp_path / "out.json")])
        assert exit_info.value.code == 2
        assert f"--max-batch {cap} is below the first batch timed (2)" in capsys.readouterr().err
        assert not (tmp_path / "out.json").exists()
