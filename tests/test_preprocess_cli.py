"""``scripts/preprocess.py``: end to end in a subprocess like a user runs it, flags in process."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from test_cache import TINY, read_csv, write_cohort

from sapsam_jax.data._cache import ProjectionCache
from sapsam_jax.io import read_manifest

REPO_ROOT = Path(__file__).resolve().parents[1]
GRID = ",".join(map(str, TINY.geometry.grid_shape))
# The script imported, for checks that need no fresh interpreter (each one costs seconds).
_spec = importlib.util.spec_from_file_location(
    "preprocess_cli", REPO_ROOT / "scripts/preprocess.py"
)
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


def preprocess(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "scripts/preprocess.py", "--backend", "cpu", "--no-progress", *args]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return write_cohort(tmp_path_factory.mktemp("cli_cohort"), n=3)


def test_cli_builds_cache_from_synthetic_cohort(tmp_path):
    from sapsam_jax.data.synthetic import make_cohort

    # Two DICOM series of one CPA patient, with lesion label maps: the real input path.
    manifest = make_cohort(
        tmp_path / "cohort",
        n_patients=1,
        shape=(40, 48, 48),
        fmt="dicom",
        scans_per_patient=(2, 2),
        control_fraction=0.0,
        progress=False,
    )
    out = tmp_path / "cache"
    run = preprocess(
        *("--manifest", str(manifest), "--out", str(out), "--preset", "tiny", "--grid", GRID),
        "--qc-png",
    )
    assert run.returncode == 0, run.stderr
    assert "2 done, 0 already cached, 0 failed" in run.stderr
    studies = read_manifest(manifest)
    cache = ProjectionCache(out)
    assert cache.study_ids == sorted(studies.study_ids)
    assert cache.config.geometry.grid_shape == TINY.geometry.grid_shape
    assert cache.preset == f"tiny-grid{GRID.replace(',', 'x')}"
    for study in studies:
        sid = study.study_id
        assert cache.meta(sid)["cpa"] == study.cpa == 1
        assert cache.bands(sid, "axial").shape[:2] == (27, 6)
        assert cache.lesions(sid, "axial").shape[0] == 6  # make_cohort writes label maps
        assert (out / "studies" / sid / "qc.png").read_bytes().startswith(b"\x89PNG")
    assert read_csv(out / "failures.csv") == []


def test_cli_bad_manifest_exits_nonzero_with_row_and_column(tmp_path, cohort):
    lines = cohort.read_text().splitlines()
    row = lines[1].split(",")
    row[lines[0].split(",").index("cpa")] = "maybe"
    bad = tmp_path / "bad_manifest.csv"
    bad.write_text("\n".join([lines[0], ",".join(row)]) + "\n")
    run = preprocess("--manifest", str(bad), "--out", str(tmp_path / "cache"))
    assert run.returncode == 2
    assert "row 2, column 'cpa'" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "cache").exists()


def test_cli_resume_and_config_mismatch(tmp_path, cohort, capsys):
    args = ["--manifest", str(cohort), "--out", str(tmp_path / "c"), "--backend", "cpu"]
    args += ["--no-progress"]
    assert cli.main([*args, "--preset", "tiny", "--grid", GRID]) == 0
    assert cli.main([*args, "--preset", "tiny", "--grid", GRID]) == 0
    assert "0 done, 3 already cached, 0 failed" in capsys.readouterr().err
    # Another preset into this cache is refused before any work.
    assert cli.main([*args, "--preset", "quick"]) == 2
    assert "new output folder" in capsys.readouterr().err
    for grid in ("24,32", "a,b,c"):  # refused, naming the flag, before a cache is made
        other = ["--manifest", str(cohort), "--out", str(tmp_path / grid), "--preset", "tiny"]
        assert cli.main([*other, "--grid", grid]) == 2
        assert "--grid takes 3 whole numbers" in capsys.readouterr().err
        assert not (tmp_path / grid).exists()


def test_cli_workers_pin_gpus_and_subshard(tmp_path, cohort, monkeypatch):
    launched = []

    class FakeProcess:
        def __init__(self, cmd, env):
            launched.append((cmd, env.get("CUDA_VISIBLE_DEVICES")))

        def poll(self):
            return 0

        def wait(self):
            return 0

    monkeypatch.setattr(cli.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(cli, "_gpu_ids", lambda backend: ["3", "5"])
    argv = ["--manifest", str(cohort), "--out", str(tmp_path / "c"), "--preset", "tiny"]
    assert cli.main([*argv, "--workers", "2", "--shard", "1/3", "--no-progress"]) == 0
    # Machine shard 1 of 3 with 2 workers: global shards 2 and 3 of 6, one GPU each.
    assert [cmd[cmd.index("--shard") + 1] for cmd, _ in launched] == ["2/6", "3/6"]
    assert [gpu for _, gpu in launched] == ["3", "5"]
    assert all("--no-progress" in cmd and "--qc-png" not in cmd for cmd, _ in launched)
    assert (tmp_path / "c" / "cache.json").exists()

    # A worker the OOM killer took (-9) fails the command, and the summaries are merged anyway.
    class SecondKilled(FakeProcess):
        def __init__(self, cmd, env):
            super().__init__(cmd, env)
            self.code = -9 if len(launched) == 2 else 0

        def poll(self):
            return self.code

        def wait(self):
            return self.code

    monkeypatch.setattr(cli.subprocess, "Popen", SecondKilled)
    launched.clear()
    assert cli.main([*argv, "--workers", "2", "--no-progress"]) == 1
    assert (tmp_path / "c" / "qc.csv").exists() and (tmp_path / "c" / "failures.csv").exists()


def test_cli_workers_progress_counts_the_studies_its_workers_own(tmp_path, cohort, monkeypatch):
    # --shard 0/2 --workers 2 runs sub-shards 0/4 and 1/4 (manifest rows 0 and 1 of 3); the bar
    # counted rows 0 and 2 (shard 0/2), so it stopped at 1 of 2 when the workers were done.
    import argparse

    import tqdm.auto

    from sapsam_jax.data._cohort import manifest_studies, shard_studies

    bars = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.total, self.n = total, 0
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, k):
            self.n += k

    class Finished:
        def poll(self):
            return 0

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    manifest = read_manifest(cohort)
    studies = manifest_studies(manifest)
    for k in range(2):
        for study in shard_studies(studies, (k, 4)):
            (tmp_path / "studies" / study.study_id).mkdir(parents=True)
    args = argparse.Namespace(out=str(tmp_path), no_progress=True, workers=2)
    cli._watch([Finished(), Finished()], args, manifest, (0, 2))
    assert (bars[0].n, bars[0].total) == (2, 2)


def test_cli_workers_refuse_an_unusable_backend_before_launching(
    tmp_path, cohort, monkeypatch, capsys
):
    # Every worker failed alone with the same error, and the advice was "rerun to finish".
    monkeypatch.setattr(cli.subprocess, "Popen", lambda *a, **k: pytest.fail("a worker started"))

    def no_gpu(name):  # as get_backend("gpu") on a machine without one (its result is cached)
        raise cli.BackendError("backend 'gpu' requested but CuPy sees no CUDA device")

    monkeypatch.setattr(cli, "get_backend", no_gpu)
    argv = ["--manifest", str(cohort), "--out", str(tmp_path / "c"), "--preset", "tiny"]
    assert cli.main([*argv, "--workers", "2", "--backend", "gpu", "--no-progress"]) == 2
    assert capsys.readouterr().err.count("error:") == 1
    assert cli.main([*argv, "--workers", "0"]) == 2
    assert "--workers takes a whole number >= 1" in capsys.readouterr().err


def test_cli_ctrl_c_interrupts_the_workers_and_waits_for_them(
    tmp_path, cohort, monkeypatch, capsys
):
    import signal

    events = []

    class Worker:
        def __init__(self, cmd, env):
            self.running = True
            events.append(env.get("SAPSAM_PREPROCESS_WORKER"))

        def poll(self):
            return None if self.running else -signal.SIGINT

        def send_signal(self, sig):
            events.append(sig)
            self.running = False

        def wait(self):
            events.append("waited")
            return -signal.SIGINT

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.subprocess, "Popen", Worker)
    monkeypatch.setattr(cli, "_gpu_ids", lambda backend: [])
    monkeypatch.setattr(cli, "_watch", interrupted)
    argv = ["--manifest", str(cohort), "--out", str(tmp_path / "c"), "--preset", "tiny"]
    assert cli.main([*argv, "--workers", "2", "--no-progress"]) == 130
    assert events == ["1", "1", signal.SIGINT, signal.SIGINT, "waited", "waited"]
    assert capsys.readouterr().err.count("interrupted") == 1
    # A terminal's Ctrl-C reaches the workers too: they stop without a line of their own (the
    # user saw one "interrupted" per process).
    monkeypatch.setattr(cli, "run", interrupted)
    monkeypatch.setenv("SAPSAM_PREPROCESS_WORKER", "1")
    assert cli.main(argv) == 130
    assert "interrupted" not in capsys.readouterr().err


def test_cli_bad_shard_flag(tmp_path, cohort, capsys):
    argv = ["--manifest", str(cohort), "--out", str(tmp_path / "c"), "--shard", "2/2"]
    assert cli.main(argv) == 2 and "0 <= i < n" in capsys.readouterr().err


def test_cli_names_studies_with_an_implausible_lung_volume(tmp_path, capsys):
    # They count as done: the run's summary said nothing, and only qc.csv held the flag (the
    # abdomen scan of real_ct, lung bases only, 0.12 L).
    from sapsam_jax.data._qc import QC_FIELDS

    rows = [["abdo", "116.9", "1"], ["chest", "4609.9", "0"], ["other_shard", "50.0", "1"]]
    lines = [",".join(QC_FIELDS)]
    lines += [",".join([sid, volume, volume, flag] + ["0.1"] * 6) for sid, volume, flag in rows]
    (tmp_path / "qc.csv").write_text("\n".join(lines) + "\n")
    cli.warn_implausible(tmp_path, TINY, {"abdo", "chest"})  # this shard's studies
    err = capsys.readouterr().err
    assert err.startswith("warning: 1 cached study has a lung volume outside 1-10 L")
    assert ": abdo;" in err and "other_shard" not in err and "qc.csv" in err
    cli.warn_implausible(tmp_path, TINY, {"chest"})
    assert capsys.readouterr().err == ""
