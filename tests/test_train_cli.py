"""End to end: `scripts/train.py` on the tiny preset (synthetic cohort -> cache -> train ->
report), then `scripts/evaluate.py` rebuilds the same test metrics from the checkpoint."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_cli")
    cmd = [
        sys.executable,
        "scripts/train.py",
        "--preset",
        "tiny",
        "--task",
        "signs",
        "--axis",
        "axial",
        "--sign",
        "cavity",
        "--epochs",
        "1",
        "--workdir",
        str(root / "run"),
        "--data-dir",
        str(root / "data"),
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run", proc


def test_train_command_writes_report_and_says_its_preset(tiny_run):
    run, proc = tiny_run
    assert proc.stdout.splitlines()[0] == "preset tiny (chosen on the command line)"
    for name in (
        "config.json",
        "split.json",
        "metrics.jsonl",
        "report.md",
        "report.json",
        "predictions_test.npz",
        "roc.png",
        "learning_curves.png",
        "confusion.png",
    ):
        assert (run / name).is_file(), name
    report = json.loads((run / "report.json").read_text())
    (row,) = report["rows"]
    assert row["row"] == "cavity" and row["axis"] == "axial"
    pred = np.load(run / "predictions_test.npz")
    assert row["metrics"]["n"] == len(pred["labels"]) > 0
    assert np.bincount(pred["labels"]).tolist()[0] == np.bincount(pred["labels"])[1]  # balanced
    split = json.loads((run / "split.json").read_text())
    assert set(split["test"]).isdisjoint(split["train"])
    assert set(pred["patient_ids"]) <= set(split["test"])
    assert row["ci_resamples"] == "patients"
    assert "resample patients" in (run / "report.md").read_text()
    scans = set(zip(pred["study_ids"], pred["subregions"], strict=True))  # scan sub-regions
    assert row["per_scan"]["metrics"]["n"] == len(scans) < len(pred["labels"])
    # The cached cohort is named by the generator version, so a newer generator never reuses it.
    from sapsam_jax.data.synthetic import GENERATOR_VERSION

    cohort = run.parent / "data" / f"synthetic-tiny-n8-seed0-v{GENERATOR_VERSION}"
    assert (cohort / "manifest.csv").is_file()


def test_train_command_scores_localisation_where_lesion_truth_exists(tiny_run):
    from sapsam_jax.data import ProjectionCache

    run, _ = tiny_run
    config = json.loads((run / "config.json").read_text())
    cache = ProjectionCache(config["cache"])
    test_patients = set(json.loads((run / "split.json").read_text())["test"])
    maps = sum(
        int(cache.lesions(s, "axial")[..., 0].any(axis=(1, 2)).sum())
        for s in cache.study_ids
        if cache.meta(s)["patient_id"] in test_patients
    )
    report = json.loads((run / "report.json").read_text())
    assert maps > 0, "the tiny cohort's seed-0 test patient shows cavities: else nothing is checked"
    (row,) = report["localisation"]
    assert (row["sign"], row["axis"], row["n"]) == ("cavity", "axial", maps)
    assert (row["method"], row["layer"]) == ("hirescam", "block2_conv2")  # the preset's maps
    assert "## Localisation" in (run / "report.md").read_text()


def test_evaluate_rebuilds_the_same_metrics_from_checkpoints(tiny_run):
    run, _ = tiny_run
    before = json.loads((run / "report.json").read_text())["rows"][0]["metrics"]
    (run / "predictions_test.npz").unlink()
    # A study of a test patient that the manifest dropped since stays in the cache folder: the
    # rebuild reads the studies the run was trained and tested on, not the whole folder.
    studies = Path(json.loads((run / "config.json").read_text())["cache"]) / "studies"
    test_patients = set(json.loads((run / "split.json").read_text())["test"])
    source = next(
        d
        for d in sorted(studies.iterdir())
        if json.loads((d / "meta.json").read_text())["patient_id"] in test_patients
    )
    dropped = studies / f"{source.name}-dropped"
    shutil.copytree(source, dropped)
    try:
        proc = subprocess.run(
            [sys.executable, "scripts/evaluate.py", "--workdir", str(run), "--no-localisation"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        shutil.rmtree(dropped)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = json.loads((run / "report.json").read_text())["rows"][0]["metrics"]
    assert after == pytest.approx(before)


def _evaluate_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate", REPO_ROOT / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_rebuilt_report_without_localisation_rows_has_no_localisation_key(tiny_run, tmp_path):
    # Training leaves the key out when no run has lesion truth to score against (disease,
    # survival, real cohorts); the rebuild wrote "localisation": [] for the same runs.
    evaluate = _evaluate_script()
    evaluate.localisation = lambda runs: []
    args = ["--workdir", str(tiny_run[0]), "--no-rebuild", "--out", str(tmp_path)]
    assert evaluate.main(args) == 0
    assert "localisation" not in json.loads((tmp_path / "report.json").read_text())


def test_evaluate_says_a_broken_manifest_in_one_error_line(tiny_run, tmp_path, capsys):
    # A run trained with --manifest reopens it; a manifest edited into errors since was a
    # ManifestError traceback.
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    (tmp_path / "cohort.csv").write_text("study_id,path\nS1,\n")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(
        json.dumps(config | {"manifest": str(tmp_path / "cohort.csv")})
    )
    assert _evaluate_script().main(["--workdir", str(run), "--no-localisation"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / "cohort.csv") in err


def test_ctrl_c_in_evaluate_is_a_line_and_status_130(tiny_run, monkeypatch, capsys):
    evaluate = _evaluate_script()

    def interrupted(run):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "rebuild_predictions", interrupted)
    assert evaluate.main(["--workdir", str(tiny_run[0]), "--no-localisation"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_evaluate_without_runs_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "scripts/evaluate.py", "--workdir", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "no training run" in proc.stderr


def test_report_table_shows_every_run_of_a_sign_and_axis():
    from sapsam_jax.evaluate._report import render_markdown

    def row(workdir, axis, f1):
        metrics = {"precision": f1, "recall": f1, "f1": f1, "auc": f1, "accuracy": f1}
        metrics |= {"n": 10, "n_positive": 5}
        ci = {k: (f1, f1) for k in metrics}
        return {"row": "cavity", "axis": axis, "workdir": workdir, "metrics": metrics, "ci95": ci}

    rows = [row("runs/all/cavity", "axial", 0.9), row("runs/seed1/cavity", "axial", 0.8)]
    rows.append(row("runs/coronal/cavity", "coronal", 0.7))
    table = render_markdown({"rows": rows})
    assert "| cavity (all/cavity) | 90.0 [90.0-90.0] | - |" in table
    assert "| cavity (seed1/cavity) | 80.0 [80.0-80.0] | - |" in table
    assert "| cavity | - | 70.0 [70.0-70.0] |" in table  # alone on its axis: one row per sign

    # Experiments under two roots with the same run layout: named apart, none dropped.
    rows = [row("/exp/lr1e-4/signs-axial-all/cavity", "axial", 0.9)]
    rows.append(row("/exp/lr1e-3/signs-axial-all/cavity", "axial", 0.5))
    rows[0] |= {"n_test_patients": 8, "epochs": {"done": 8, "planned": 8, "best": 6}}
    rows[1] |= {"n_test_patients": 3, "epochs": {"done": 1, "planned": 8, "best": 1}}
    table = render_markdown({"rows": rows})
    assert "| cavity (lr1e-4/signs-axial-all/cavity) | 90.0 [90.0-90.0] |" in table
    incomplete = "cavity (lr1e-3/signs-axial-all/cavity) (*incomplete*: 1/8 epochs)"
    assert f"| {incomplete} | 50.0 [50.0-50.0] |" in table
    assert "| axial | 10 | 5 | 8 | ? | 8/8 (6) | 90.0 |" in table  # test patients, epochs (best)
    assert f"Fewer than 5 test patients ({incomplete})" in table


def test_a_batch_larger_than_the_training_set_is_an_error_line(tiny_run, tmp_path, capsys):
    from sapsam_jax.job import main

    run, _ = tiny_run  # its cohort and cache are reused: no new data
    flags = ["--preset", "tiny", "--task", "signs", "--axis", "axial", "--sign", "cavity"]
    flags += ["--epochs", "1", "--batch-size", "4096", "--data-dir", str(run.parent / "data")]
    assert main([*flags, "--workdir", str(tmp_path / "big")]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "training samples are fewer than one batch of 4096" in err
    assert f"{tmp_path / 'big'} records batch size 4096" in err


def test_evaluate_names_every_workdir_that_adds_no_run(tiny_run, tmp_path):
    from sapsam_jax.evaluate import find_runs

    run, _ = tiny_run
    relative = Path(os.path.relpath(run, REPO_ROOT))
    assert find_runs([run, relative, run.parent]) == [run]  # one run, however it is named
    typo = tmp_path / "signs-coronal-typo"
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(
        [sys.executable, "scripts/evaluate.py", "--workdir", str(run), str(typo), str(empty)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert f"error: {typo} does not exist" in proc.stderr
    assert f"error: no training run (config.json + run.json) at or below {empty}" in proc.stderr

    # A run killed before its first epoch ended is named, not silently left out; a damaged
    # one stops the report with its folder named (no traceback).
    root = tmp_path / "runs"
    shutil.copytree(run, root / "done", ignore=shutil.ignore_patterns("checkpoints"))
    (root / "killed").mkdir()
    for name in ("config.json", "run.json", "split.json"):
        shutil.copy(run / name, root / "killed" / name)
    cmd = [sys.executable, "scripts/evaluate.py", "--workdir", str(root), "--no-rebuild"]
    cmd += ["--no-localisation"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    killed = root / "killed"
    assert f"warning: {killed} left out of the report: no saved test predictions" in proc.stderr
    config = json.loads((root / "done" / "config.json").read_text())
    (root / "done" / "config.json").write_text(json.dumps(config | {"old_field": 1}))
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: run {root / 'done'}: cannot report it" in proc.stderr


def test_help_shows_each_task_s_preset_values():
    from sapsam_jax.train._cli import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "paper preset: 60 disease / 240 signs / 20 survival; quick: 15 disease / 8 signs" in text
    assert "paper preset: 0.0; quick: 1.0 disease / 3.0 signs / 1.0 survival" in text  # warm-up
    assert "paper preset: None; quick: None disease / 9 signs / None survival" in text
    # --task picks the task: its help gives the default task, not a value per task.
    assert "--task {disease,signs,survival} default: signs" in text
    assert "disease disease" not in text


def test_none_sets_a_preset_s_optional_value_back_to_none(capsys):
    # The quick preset clips gradients and draws 9 rotations per sign epoch; a user could not
    # undo either from the command line, since a flag's None means "not given".
    from sapsam_jax.train._cli import parse_config

    cfg, _ = parse_config(["--preset", "quick", "--task", "signs"])
    assert (cfg.grad_clip_norm, cfg.rotations_per_epoch, cfg.cam_layer) == (1.0, 9, "block2_conv2")
    cfg, _ = parse_config(
        ["--preset", "quick", "--grad-clip-norm", "none", "--rotations-per-epoch", "None"]
        + ["--cam-layer", "none", "--image-size", "none", "--epochs", "none"]
    )
    assert (cfg.grad_clip_norm, cfg.rotations_per_epoch, cfg.cam_layer) == (None, None, None)
    assert (cfg.image_size, cfg.num_epochs) == (None, 240)  # the paper's sign epochs
    assert parse_config(["--preset", "quick", "--image-size", "none", "64"]) == 2
    assert "--image-size takes none alone" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # still a number otherwise
        parse_config(["--grad-clip-norm", "nan-ish"])
    assert "invalid float value: 'nan-ish'" in capsys.readouterr().err


def test_train_command_mistakes_are_error_lines_before_any_work(tmp_path, capsys):
    from sapsam_jax.job import main
    from sapsam_jax.models import build_model, save_weights

    base = ["--preset", "tiny", "--data-dir", str(tmp_path / "data")]
    (tmp_path / "vgg19_weights.h5").write_bytes(b"\x89HDF\r\n")  # as downloaded, unconverted
    bad = {
        "image_size takes 2 positive values": ["--image-size", "32"],
        r"image_size \(16, 16\) is below vgg19's smallest input, 32 x 32": [
            "--image-size",
            "16",
            "16",
        ],
        "zoom_range takes 2 values": ["--zoom-range", "1.2", "0.8"],
        "split_fractions takes 3 values": ["--split-fractions", "0.5", "0.5"],
        "--manifest .* or --cache, not both": ["--manifest", "m.csv", "--cache", "c"],
        "not a weights directory": ["--weights", str(tmp_path / "nowhere")],
        "vgg19_weights.h5 is a file, not a weights directory: convert it first": [
            "--weights",
            str(tmp_path / "vgg19_weights.h5"),
        ],
        "cam_layer 'block5_conv5' is not a layer of vgg19": ["--cam-layer", "block5_conv5"],
        "epochs must be >= 1, not 0": ["--epochs", "0"],
        "learning_rate must be > 0, not -1.0": ["--learning-rate", "-1"],
        "batch_size must be >= 1, not 0": ["--batch-size", "0"],
        "grad_clip_norm must be > 0, not nan": ["--grad-clip-norm", "nan"],
        r"momentum must be in \[0, 1\), not 1.5": ["--momentum", "1.5"],
        "survival test share 0.8 and disease validation share 0.2 leave no training set": [
            "--task",
            "survival",
            "--survival-split-fractions",
            "0.2",
            "0",
            "0.8",
        ],
    }
    for message, flags in bad.items():
        assert main([*base, *flags]) == 2, flags
        assert __import__("re").search(message, capsys.readouterr().err), message
    assert not (tmp_path / "data").exists()  # refused before the cohort is generated
    with pytest.raises(SystemExit):
        main([*base, "--backend", "tpu"])  # a choice, checked by argparse

    # Converted ImageNet weights are full width: the preset's 1/16 width yields to them.
    from flax import nnx

    from sapsam_jax.train._cli import build_parser, config_from_args

    weights = save_weights(
        build_model("vgg19", rngs=nnx.Rngs(0), width=0.25, head_units=8), tmp_path / "w"
    )
    cfg, reason = config_from_args(build_parser().parse_args([*base, "--weights", str(weights)]))
    assert cfg.width == 0.25 and "width 0.25 from --weights" in reason
    args = build_parser().parse_args([*base, "--weights", str(weights), "--width", "0.5"])
    assert config_from_args(args)[0].width == 0.5  # asked for explicitly: the load will say

    # The architecture too: InceptionV3 weights build an InceptionV3, before any preprocessing;
    # weights training cannot use, or that contradict --arch, are error lines.
    inception = save_weights(
        build_model("inception_v3", rngs=nnx.Rngs(0), width=0.125, head_units=8), tmp_path / "i"
    )
    cfg, reason = config_from_args(build_parser().parse_args([*base, "--weights", str(inception)]))
    assert (cfg.arch, cfg.cam_layer) == ("inception_v3", None) and "arch inception_v3" in reason
    vgg16 = save_weights(
        build_model("vgg16", rngs=nnx.Rngs(0), width=0.125, head_units=8), tmp_path / "v16"
    )
    assert main([*base, "--weights", str(vgg16)]) == 2
    assert "holds vgg16 weights; training builds vgg19 or inception_v3" in capsys.readouterr().err
    assert main([*base, "--weights", str(inception), "--arch", "vgg19"]) == 2
    assert "holds inception_v3 weights, not --arch vgg19" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_a_workdir_of_another_run_is_an_error_line(tiny_run, capsys, tmp_path):
    from sapsam_jax.job import main

    run, _ = tiny_run
    argv = ["--preset", "tiny", "--task", "signs", "--sign", "cavity", "--seed", "7"]
    argv += ["--data-dir", str(tmp_path / "data")]
    assert main([*argv, "--axis", "axial", "--workdir", str(run)]) == 2
    assert "belongs to a different run" in capsys.readouterr().err
    # Refused before the cohort and its cache were made (minutes on the quick preset).
    assert not (tmp_path / "data").exists()
    # --sign all checks each sign's folder; a survival job its disease network's too.
    signs = tmp_path / "signs"
    (signs / "fungus_ball").mkdir(parents=True)
    (signs / "fungus_ball" / "config.json").write_text((run / "config.json").read_text())
    assert main([*argv[:4], "--sign", "all", "--workdir", str(signs), *argv[6:]]) == 2
    assert f"{signs / 'fungus_ball' / 'config.json'} belongs to a different run" in (
        capsys.readouterr().err
    )
    survival = tmp_path / "survival"
    (survival / "disease").mkdir(parents=True)
    (survival / "disease" / "config.json").write_text((run / "config.json").read_text())
    assert (
        main(["--preset", "tiny", "--task", "survival", "--workdir", str(survival), *argv[6:]]) == 2
    )
    assert f"{survival / 'disease' / 'config.json'} belongs to a different run" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "data").exists()


def test_an_interrupted_built_in_cohort_resumes(tmp_path, monkeypatch):
    # The main job's cohort is generated in a temporary folder; an interrupted generation used to
    # be deleted and started again.
    from sapsam_jax.data.synthetic import _cohort
    from sapsam_jax.train import TINY
    from sapsam_jax.train._data import ensure_synthetic_cohort

    cfg = TINY.replace(data_dir=str(tmp_path))
    real, generated = _cohort.generate_patient, []

    def interrupted_at_the_third(index, **options):
        if len(generated) == 2:
            raise KeyboardInterrupt
        generated.append(index)
        return real(index, **options)

    monkeypatch.setattr(_cohort, "generate_patient", interrupted_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic_cohort(cfg, log=lambda *_: None)

    def counted(index, **options):
        generated.append(index)
        return real(index, **options)

    monkeypatch.setattr(_cohort, "generate_patient", counted)
    manifest = ensure_synthetic_cohort(cfg, log=lambda *_: None)
    assert generated == list(range(cfg.synthetic.n_patients))  # none generated twice
    assert manifest.is_file()
    assert not manifest.parent.with_name(f".tmp-{manifest.parent.name}").exists()


def _saved_run(folder: Path, labels, probs, patients=None, studies=None, **changes) -> Path:
    """A finished disease run as the report reads it: config, run.json, saved test predictions
    (no checkpoints, as when run folders are copied without them)."""
    from sapsam_jax.train import TINY

    folder.mkdir(parents=True)
    cfg = TINY.replace(**{"task": "disease", "axis": "axial", "workdir": str(folder)} | changes)
    (folder / "config.json").write_text(cfg.to_json())
    (folder / "run.json").write_text("{}")
    arrays = {"labels": np.asarray(labels), "probs": np.asarray(probs, np.float32)}
    if patients is not None:
        arrays["patient_ids"] = np.asarray(patients, str)
    if studies is not None:
        arrays["study_ids"] = np.asarray(studies, str)
        arrays["subregions"] = np.full(len(arrays["labels"]), -1)  # whole-scan images
    np.savez(folder / "predictions_test.npz", **arrays)
    return folder


def _evaluate(*args):
    cmd = [sys.executable, "scripts/evaluate.py", "--no-localisation", *map(str, args)]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_evaluate_with_nothing_to_report_is_an_error_and_keeps_the_old_report(tmp_path):
    killed = tmp_path / "killed"  # killed before its first checkpoint: no predictions either
    killed.mkdir()
    for name in ("config.json", "run.json"):
        (killed / name).write_text("{}")
    (tmp_path / "report.md").write_text("the last good report\n")
    proc = _evaluate("--workdir", tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: no run to report" in proc.stderr
    assert (tmp_path / "report.md").read_text() == "the last good report\n"


def test_evaluate_says_a_run_without_checkpoints_is_reported_from_its_predictions(tmp_path):
    run = _saved_run(tmp_path / "copied", [0, 1, 0, 1], [0.2, 0.9, 0.6, 0.7], ["a", "a", "b", "b"])
    proc = _evaluate("--workdir", run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "left out" not in proc.stderr
    assert f"warning: {run} has no checkpoint: its saved test predictions are reported" in (
        proc.stderr
    )
    (row,) = json.loads((run / "report.json").read_text())["rows"]
    assert row["metrics"]["precision"] == pytest.approx(2 / 3)  # tp 2, fp 1 (the 0.6)


def test_a_truncated_predictions_file_is_a_report_error_naming_the_run(tmp_path):
    from sapsam_jax.evaluate import ReportError, run_results

    for name, keep in (("half", 0.5), ("empty", 0.0)):
        run = _saved_run(tmp_path / name, [0, 1] * 50, np.linspace(0, 1, 100))
        data = (run / "predictions_test.npz").read_bytes()
        (run / "predictions_test.npz").write_bytes(data[: int(len(data) * keep)])
        with pytest.raises(ReportError, match=f"run {run}: cannot report it"):
            run_results(run)


def test_report_names_rows_whose_intervals_resample_images_not_patients(tmp_path):
    from sapsam_jax.evaluate import render_markdown, run_results

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1] * 4, 27)  # 8 scans x 27 rotations
    probs = np.clip(labels * 0.4 + rng.random(len(labels)) * 0.6, 0, 1)
    old = _saved_run(tmp_path / "old", labels, probs)  # saved before patient ids were
    rows = run_results(old)["rows"]
    assert rows[0]["ci_resamples"] == "images"
    table = render_markdown({"rows": rows})
    assert "intervals that resample patients (except the rows named below)" in table
    assert "The intervals of disease resample test images, not patients" in table

    new = _saved_run(tmp_path / "new", labels, probs, np.repeat([f"P{i}" for i in range(8)], 27))
    table = render_markdown({"rows": run_results(new)["rows"]})
    assert "resample patients (laid out like" in table and "resample test images" not in table


def test_report_says_in_which_settings_its_runs_differ(tmp_path):
    from sapsam_jax.evaluate import render_markdown, run_results

    labels = np.repeat([0, 1] * 4, 3)
    probs = labels * 0.5 + 0.25
    patients = np.repeat([f"P{i}" for i in range(8)], 3)

    def rows(*runs):
        return [row for run in runs for row in run_results(run)["rows"]]

    axial = _saved_run(tmp_path / "axial", labels, probs, patients)
    coronal = _saved_run(tmp_path / "coronal", labels, probs, patients, axis="coronal")
    assert "differ in these settings" not in render_markdown({"rows": rows(axial, coronal)})
    changes = {"axis": "sagittal", "arch": "inception_v3", "eval_rotations": "identity"}
    other = _saved_run(tmp_path / "other", labels, probs, patients, **changes)
    table = render_markdown({"rows": rows(axial, coronal, other)})
    assert "The runs in this table differ in these settings" in table
    assert "- arch: vgg19: disease axial, disease coronal; inception_v3: disease sagittal" in table
    assert (
        "- eval_rotations: all: disease axial, disease coronal; identity: disease sagittal" in table
    )
    assert "- seed:" not in table and "- preset:" not in table


def test_undefined_scores_print_as_n_a_like_the_report():
    # A sign without test positives has no recall, F1 or AUC: report.md says n/a, and so must
    # the lines the command prints (they said "nan").
    from sapsam_jax.job import summary_line
    from sapsam_jax.train._loop import _epoch_line

    nan = float("nan")
    line = summary_line(
        "fungus_ball", {"precision": 0.5, "recall": nan, "f1": None, "auc": nan, "n": 4}
    )
    assert line == "fungus_ball: test precision 0.500 recall n/a F1 n/a AUC n/a (n=4)"
    record = {"epoch": 2, "train_loss": 0.25, "train_f1": nan, "val_f1": 0.5, "val_auc": nan}
    line = _epoch_line("cavity", {**record, "images_per_s": 300.0})
    assert line == "[cavity] epoch 2: loss 0.2500 train_f1 n/a val_f1 0.500 val_auc n/a (300 img/s)"
    assert "nan" not in line


def test_ctrl_c_is_a_line_saying_how_to_resume(tmp_path, monkeypatch, capsys):
    # Ctrl-C used to end in a traceback, and inside a jitted step in JAX's unrelated "Exception
    # raised while checking equality of metadata fields of pytree" (exit status 1).
    import sapsam_jax.job as job

    def interrupted(cfg):
        raise KeyboardInterrupt

    def interrupted_inside_jax(cfg):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as err:
            raise ValueError("Exception raised while checking equality of metadata") from err

    argv = ["--preset", "tiny", "--data-dir", str(tmp_path / "data")]
    for fake in (interrupted, interrupted_inside_jax):
        monkeypatch.setattr(job, "train_and_report", fake)
        assert job.main(argv) == 130
        assert "interrupted; rerun the same command to resume" in capsys.readouterr().err

    def broken(cfg):
        raise ValueError("a bug, not an interrupt")

    monkeypatch.setattr(job, "train_and_report", broken)
    with pytest.raises(ValueError, match="a bug"):
        job.main(argv)


def test_a_multi_label_run_says_its_printed_scores_pool_the_signs(monkeypatch, capsys, tmp_path):
    import sapsam_jax.job as job

    metrics = {"precision": 0.5, "recall": 0.25, "f1": 1 / 3, "auc": 0.75, "n": 12}
    monkeypatch.setattr(job, "train_and_report", lambda cfg: {"multi": metrics})
    assert job.main(["--preset", "tiny", "--sign", "multi", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "multi (the three signs pooled; per sign in report.md): test precision 0.500" in out


# Five test scans of four patients, three rotated projections each: (patient, study, label, probs).
SCANS = [
    ("P0", "S0", 1, [0.9, 0.4, 0.5]),  # mean 0.6: true positive
    ("P0", "S1", 1, [0.3, 0.3, 0.45]),  # mean 0.35: false negative
    ("P1", "S2", 0, [0.2, 0.7, 0.3]),  # mean 0.4: true negative
    ("P2", "S3", 0, [0.6, 0.6, 0.1]),  # mean 0.433: true negative
    ("P3", "S4", 1, [0.8, 0.9, 0.7]),  # mean 0.8: true positive
]


def _projections(scans, order):
    rows = [(p, s, y, q) for p, s, y, probs in scans for q in probs]
    rows = [rows[i] for i in order]  # the saved order need not keep a scan's images together
    patients, studies, labels, probs = (list(column) for column in zip(*rows, strict=True))
    return labels, probs, patients, studies


def test_report_scores_each_scan_by_the_mean_of_its_rotated_projections(tmp_path):
    from sapsam_jax.evaluate import render_markdown, run_results

    order = np.random.default_rng(0).permutation(15)
    run = _saved_run(tmp_path / "run", *_projections(SCANS, order))
    (row,) = run_results(run)["rows"]
    # Per image (counted by hand): 5 of the 9 CPA images and 3 of the 6 control images >= 0.5.
    assert row["metrics"]["precision"] == pytest.approx(5 / 8)
    assert row["metrics"]["f1"] == pytest.approx(10 / 17)
    # Per scan: tp 2 (S0, S4), fn 1 (S1), tn 2.
    scans = row["per_scan"]["metrics"]
    assert (scans["n"], scans["n_positive"]) == (5, 3)
    assert scans["precision"] == pytest.approx(1.0)
    assert scans["recall"] == pytest.approx(2 / 3)
    assert scans["f1"] == pytest.approx(0.8)
    # AUC of the means 0.6, 0.35, 0.8 (CPA) against 0.4, 0.433 (control): 4 of 6 pairs.
    assert scans["auc"] == pytest.approx(4 / 6)
    table = render_markdown({"rows": [row]})
    assert "Per scan (sign rows: per scan sub-region): the mean probability" in table
    assert "| disease | 100.0 [" in table and "| 5 (3) |" in table

    single = [(p, s, y, probs[:1]) for p, s, y, probs in SCANS]  # one projection per scan
    alone = _saved_run(tmp_path / "identity", *_projections(single, range(5)))
    assert "Per scan" not in render_markdown({"rows": run_results(alone)["rows"]})


def test_per_scan_keeps_sub_regions_and_sign_columns_apart():
    from sapsam_jax.evaluate._report import per_scan

    # One scan, two sub-regions, two rotations each; three sign columns (--sign multi).
    pred = {
        "patient_ids": np.array(["P0"] * 4),
        "study_ids": np.array(["S0"] * 4),
        "subregions": np.array([0, 3, 0, 3]),
        "labels": np.array([[1, 0, 0], [0, 0, 1], [1, 0, 0], [0, 0, 1]]),
        "probs": np.array([[0.2, 0.1, 0.0], [0.5, 0.3, 0.9], [0.6, 0.3, 0.2], [0.1, 0.1, 0.7]]),
    }

    class Saved(dict):
        files = property(lambda self: list(self))

    labels, probs, patients = per_scan(Saved(pred))
    assert labels.tolist() == [[1, 0, 0], [0, 0, 1]]
    np.testing.assert_allclose(probs, [[0.4, 0.2, 0.1], [0.3, 0.2, 0.8]])
    assert patients.tolist() == ["P0", "P0"]


def test_per_scan_does_not_join_patient_and_study_ids_into_one_key():
    from sapsam_jax.evaluate._report import per_scan

    # Patient "1" with study "10" and patient "11" with study "0" (numeric manifest ids) are two
    # scans; numpy string concatenation drops a NUL separator, so both keys read "110".
    pred = {
        "patient_ids": np.array(["1", "1", "11", "11"]),
        "study_ids": np.array(["10", "10", "0", "0"]),
        "subregions": np.full(4, -1),
        "labels": np.array([1, 1, 1, 1]),
        "probs": np.array([0.2, 0.4, 0.8, 0.6]),
    }

    class Saved(dict):
        files = property(lambda self: list(self))

    labels, probs, patients = per_scan(Saved(pred))
    assert sorted(patients.tolist()) == ["1", "11"]
    np.testing.assert_allclose(sorted(probs), [0.3, 0.7])


def test_a_scan_whose_projections_disagree_on_the_label_is_a_report_error(tmp_path):
    from sapsam_jax.evaluate import ReportError, run_results

    labels, probs, patients, studies = _projections(SCANS, range(15))
    labels[0] = 0  # one projection of S0 says control
    run = _saved_run(tmp_path / "run", labels, probs, patients, studies)
    with pytest.raises(ReportError, match="projections of one scan carry different labels"):
        run_results(run)
