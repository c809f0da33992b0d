"""The training loop: one workdir per (task, axis, sign), resumable, data parallel, reported.

Paper 2.3-2.4 and 3.1-3.3. ``train(cfg)`` is what ``scripts/train.py`` calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from sapsam_jax.config import SIGNS
from sapsam_jax.data import (
    ProjectionCache,
    SampleSet,
    SplitError,
    balance_indices,
    check_split,
    split_by_patient,
    study_label,
    task_samples,
)
from sapsam_jax.data._cache import atomic_write_text, nonfinite_to_null, to_jsonable
from sapsam_jax.io._volume import atomic_path
from sapsam_jax.models import MIN_INPUT_SIZE
from sapsam_jax.train._checkpoint import RunCheckpoints, saved_epochs
from sapsam_jax.train._config import TrainConfig, check_new_run
from sapsam_jax.train._data import Batches, data_mesh, prepare_cache, to_global, to_host
from sapsam_jax.train._distributed import (
    is_primary,
    maybe_initialize_distributed,
    primary_log,
)
from sapsam_jax.train._metrics import binary_metrics, format_score
from sapsam_jax.train._model import CONVENTIONS, build_model, check_same_network, new_model
from sapsam_jax.train._step import (
    StepSpec,
    frozen_block_names,
    make_eval_step,
    make_optimizer,
    make_train_step,
    set_train_mode,
)


class WorkdirError(ValueError):
    """The workdir holds another run (other task, data, model or optimisation settings)."""


class BatchTooLargeError(ValueError):
    """An epoch of the training set does not fill one batch."""


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


@dataclass
class RunData:
    train: SampleSet
    val: SampleSet | None
    test: SampleSet
    split: dict


def train(cfg: TrainConfig, *, log=print) -> dict:
    """Train the network(s) ``cfg`` describes and predict their test patients; returns the test
    metrics of every network it trained. ``sapsam_jax.job.train_and_report`` adds the report."""
    maybe_initialize_distributed()
    log = primary_log(log)
    check_cam_layer(cfg)
    check_init_from(cfg)
    runs = planned_runs(cfg.replace(workdir=str(cfg.workdir_path)))
    for _, run in runs:  # before the cohort and its cache, which take minutes
        _check_config(run, run.workdir_path)
    cache = prepare_cache(cfg, log=log)
    data = {"cache": str(Path(cache.path).absolute())}
    if cache.preset and cache.preset != cfg.preprocess_preset:
        # --cache of another preset: config.json records what the images really are.
        log(
            f"the cache {cache.path} holds preprocessing preset {cache.preset!r}, not "
            f"{cfg.preprocess_preset!r}; training on it as it is"
        )
        data["preprocess_preset"] = cache.preset
    results = {}
    for name, run in runs:
        metrics = fit(run.replace(**data), cache, log=log)
        if name is not None:
            results[name] = metrics
    return results


def planned_runs(cfg: TrainConfig) -> list[tuple[str | None, TrainConfig]]:
    """(result name, config) of each network ``cfg`` trains, in order; a network trained only to
    start another from has no result name."""
    workdir = cfg.workdir_path
    if cfg.task == "signs" and cfg.sign == "all":
        # Paper 2.4: one binary network per sign, trained in turn.
        return [(s, cfg.replace(sign=s, workdir=str(workdir / s))) for s in SIGNS]
    if cfg.task == "survival" and cfg.init_from is None:
        # Paper 2.4: the survival network starts from the disease network; train that first.
        disease_dir = workdir / "disease"
        disease_cfg = cfg.replace(
            task="disease",
            workdir=str(disease_dir),
            epochs=None,
            split_fractions=disease_fractions_for_survival(cfg),
        )
        if cfg.preset != "paper":
            disease_cfg = disease_cfg.replace(epochs=_preset_epochs(cfg, "disease"))
        return [(None, disease_cfg), ("survival", cfg.replace(init_from=str(disease_dir)))]
    return [(cfg.sign if cfg.task == "signs" else cfg.task, cfg)]


def disease_fractions_for_survival(cfg: TrainConfig) -> tuple[float, float, float]:
    """Split fractions of the disease network a survival job trains first: its validation share,
    and the survival test share (paper 3.3: a third) as its test share. The survival network is
    tested on the disease network's test patients (:func:`_survival_split`), so none of them was
    trained on, or chose a checkpoint, for the network it starts from."""
    test, val = cfg.survival_split_fractions[2], cfg.split_fractions[1]
    if not 0 < test < 1 - val:
        raise ValueError(
            f"survival test share {test} and disease validation share {val} leave no training set"
        )
    return (1.0 - val - test, val, test)


def _preset_epochs(cfg, task: str) -> int:
    from sapsam_jax.train._config import preset_config

    return preset_config(cfg.preset, task).num_epochs


def check_cam_layer(cfg: TrainConfig) -> None:
    """Fail before any work when ``cfg.cam_layer`` is not a layer of the run's architecture."""
    if cfg.cam_layer is None:
        return
    model = nnx.eval_shape(lambda: new_model(cfg, 2, nnx.Rngs(0)))  # shapes only, no weights
    if cfg.cam_layer not in model.layer_names:
        raise ValueError(
            f"cam_layer {cfg.cam_layer!r} is not a layer of {cfg.arch}; "
            f"choose one of {', '.join(model.layer_names)}"
        )


def check_init_from(cfg: TrainConfig) -> None:
    """Fail before any work when ``--init-from`` names no trained run, or a run of another
    network (architecture, width, head size: its weights would not describe this one)."""
    if not cfg.init_from:
        return
    source = Path(cfg.init_from)
    for name in ("config.json", "run.json", "split.json"):
        if not (source / name).is_file():
            raise WorkdirError(f"--init-from {source} is not a training workdir: {name} is missing")
    if not (saved_epochs(source, "best") or saved_epochs(source, "latest")):
        raise WorkdirError(f"--init-from {source} holds no checkpoint yet (killed in epoch 1?)")
    there = read_run_config(source / "config.json")
    check_same_network(cfg, there, error=WorkdirError)
    if cfg.task == "survival":  # its split follows this run's test patients (_survival_split)
        _init_from_split(source)


def _init_from_split(source: Path) -> dict:
    """The split.json of the ``--init-from`` run (a new --workdir would not mend a damaged one)."""
    return read_split(
        source / "split.json",
        remedy="restore it, or give --init-from a run whose split.json is intact",
        what=f"--init-from {source}: ",
    )


def fit(cfg: TrainConfig, cache: ProjectionCache, *, log=print) -> dict:
    """Train one network in ``cfg.workdir`` (resuming its checkpoint); return test metrics.

    In a multi-process job every process calls it; the first one writes the files and logs.
    """
    workdir = Path(cfg.workdir)
    new_run = not (workdir / "config.json").exists()
    if new_run:
        check_new_run(cfg)
    created = [d for d in (workdir, *workdir.parents) if not d.exists()]  # innermost first
    workdir.mkdir(parents=True, exist_ok=True)
    log = primary_log(log)
    _check_or_write_config(cfg, workdir)
    try:
        data = load_run_data(cfg, cache, workdir)
    except SplitError:
        if new_run and is_primary():  # refused before it began: leave no run behind
            (workdir / "config.json").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                for folder in created:
                    folder.rmdir()  # only folders this call made, and only while empty
        raise
    _warn_one_class_sets(data, cfg, log)
    model, preprocessing = build_model(cfg, num_classes=_num_classes(cfg), seed=cfg.seed)
    spec = _step_spec(cfg, data.train, preprocessing)
    _write_json_atomic(
        workdir / "run.json",
        {
            "preprocessing": preprocessing,
            "image_size": list(spec.image_size),
            "num_classes": _num_classes(cfg),
            "multi_label": spec.multi_label,
            # Conventions the weights switched on (torchvision Inception: BN scale, padded pools).
            "model_conventions": {k: v for k, v in model.config.items() if k in CONVENTIONS},
        },
    )
    mesh = data_mesh()
    batch_size = _global_batch_size(cfg.batch_size, mesh.size)
    if batch_size != cfg.batch_size:
        log(f"batch size {cfg.batch_size} -> {batch_size}: a multiple of the {mesh.size} devices")
    if cfg.frozen_blocks and not (cfg.weights or cfg.init_from):
        log(
            f"warning: the first {cfg.frozen_blocks} blocks are frozen at their random "
            "initialisation (no --weights): pass converted ImageNet weights as the paper does, "
            "or --frozen-blocks 0"
        )
    # An epoch may draw only some of the 27 rotations (rotations_per_epoch): count its own steps,
    # so that warmup_epochs counts epochs.
    epoch_size = len(
        epoch_order(data.train.rotations, cfg.rotations_per_epoch, seed=cfg.seed, epoch=1)
    )
    optimizer = make_optimizer(model, cfg, max(epoch_size // batch_size, 1))
    _replicate((model, optimizer), NamedSharding(mesh, P()))
    ckpts = RunCheckpoints(workdir)
    meta = ckpts.restore_latest(model, optimizer) or {"epoch": 0, "best_epoch": 0}
    if meta.get("best_score") is None:  # nothing saved as best yet
        meta["best_score"] = float("inf") if cfg.select_by == "val_loss" else -float("inf")
    if meta["epoch"]:
        log(f"{workdir}: resuming after epoch {meta['epoch']}")
    _truncate_metrics(workdir / "metrics.jsonl", meta["epoch"])
    batches = Batches(
        data.train.images,
        data.train.labels,
        NamedSharding(mesh, P("data")),
        NamedSharding(mesh, P()),
        rotations=data.train.rotations,
    )
    frozen = frozen_block_names(model, cfg.frozen_blocks)
    tensorboard = _tensorboard_writer(workdir) if cfg.tensorboard and is_primary() else None
    for epoch in range(meta["epoch"] + 1, cfg.num_epochs + 1):
        record = _train_epoch(cfg, model, optimizer, batches, spec, frozen, epoch, batch_size, mesh)
        if data.val is not None:
            record |= {
                f"val_{k}": v for k, v in evaluate_samples(model, spec, data.val, mesh).items()
            }
        # Paper 3.1: "checkpoint evaluated on the validation data" (cfg.select_by). Survival has
        # no validation set (3.3), so its best checkpoint is simply the last epoch.
        improved = data.val is None or _improves(record[cfg.select_by], meta["best_score"], cfg)
        meta = {
            "epoch": epoch,
            "select_by": cfg.select_by,
            "best_score": record[cfg.select_by]
            if data.val is not None and improved
            else meta["best_score"],
            "best_epoch": epoch if improved else meta["best_epoch"],
        }
        # The line first: a kill between the two leaves a line for an epoch without checkpoint,
        # which the resumed run truncates and redoes (the other order would lose the line).
        _append_metrics(workdir / "metrics.jsonl", record)
        # The loss is computed before the update: the last step's could still have left
        # non-finite weights, which every resume would restore and fail on.
        _check_finite_parameters(model, epoch)
        ckpts.save(model, optimizer, meta, best=improved)  # every process takes part
        if tensorboard is not None:
            _log_tensorboard(tensorboard, record)
        log(_epoch_line(workdir.name, record))
    if tensorboard is not None:
        tensorboard.close()
    if data.val is not None and not meta["best_epoch"]:
        # E.g. --select-by val_auc on a validation set of one class: restore_best falls back to
        # the latest weights, which the report would otherwise present as the best epoch's.
        log(
            f"warning: no epoch had a defined {cfg.select_by}; the test predictions come from "
            "the last epoch"
        )
    ckpts.restore_best(model)
    ckpts.close()
    return write_test_predictions(model, spec, data.test, mesh, workdir)


def _improves(value: float, best: float, cfg: TrainConfig) -> bool:
    """Whether an epoch's validation ``value`` of ``cfg.select_by`` beats the best checkpoint's:
    a lower loss or a higher metric. An undefined metric (NaN) never does."""
    if not math.isfinite(value):
        return False
    return value < best if cfg.select_by == "val_loss" else value > best


def load_run_data(cfg: TrainConfig, cache: ProjectionCache, workdir: Path) -> RunData:
    """Split by patient (saved in split.json, reused on resume) and gather balanced samples."""
    split = _load_or_make_split(cfg, cache, workdir)
    studies = {name: _studies_of(cache, split[name], cfg) for name in ("train", "val", "test")}
    record = _data_record(cache, studies)
    # Patients with a label for this task that no set holds (added to the manifest since).
    assigned = set(split["train"]) | set(split["val"]) | set(split["test"])
    eligible = _studies_of(cache, {cache.meta(s)["patient_id"] for s in cache.study_ids}, cfg)
    record["unassigned"] = sorted({cache.meta(s)["patient_id"] for s in eligible} - assigned)
    _check_or_record_data(workdir / "split.json", split, record)
    sample = dict(task=cfg.task, axis=cfg.axis, sign=cfg.sign)
    train_set = task_samples(cache, studies["train"], rotations="all", **sample)
    test_set = task_samples(cache, studies["test"], rotations=cfg.eval_rotations, **sample)
    val_set = (
        task_samples(cache, studies["val"], rotations=cfg.eval_rotations, **sample)
        if studies["val"]
        else None
    )
    if not cfg.multi_label:
        # Paper 2.3: "train and test subsets were balanced after the split".
        groups = train_set.subregions if cfg.balance_by_subregion else None
        train_set = train_set.subset(
            balance_indices(train_set.labels, mode=cfg.train_balance, seed=cfg.seed, groups=groups)
        )
        test_set = test_set.subset(
            balance_indices(test_set.labels, mode=cfg.test_balance, seed=cfg.seed)
        )
        if val_set is not None:
            # Balanced like the test set: the kept epoch is chosen on the class mix it is scored
            # on. On the unbalanced set (mostly sign-free sub-regions) the lowest loss went to the
            # epoch leaning most to "no sign": a pleural network kept at validation recall 0.60
            # over an equal-loss epoch at 0.86 reached test recall 0.39 (README, "Measured").
            val_set = val_set.subset(
                balance_indices(val_set.labels, mode=cfg.test_balance, seed=cfg.seed)
            )
    return RunData(train_set, val_set, test_set, split)


def _warn_one_class_sets(data: RunData, cfg: TrainConfig, log) -> None:
    """Say so when a set holds one class only: the network then learns nothing of the other, and
    test precision, recall, F1 and AUC come out undefined (NaN, "n/a" in the report)."""
    label = cfg.sign if cfg.task == "signs" else cfg.task
    sets = {"training": data.train, "validation": data.val, "test": data.test}
    for name, samples in sets.items():
        if samples is None or not len(samples):
            continue
        labels = np.asarray(samples.labels).reshape(len(samples), -1)
        for k in range(labels.shape[1]):
            positives = int(labels[:, k].sum())
            if positives in (0, len(labels)):
                which = SIGNS[k] if labels.shape[1] > 1 else label
                kind = "no positive" if positives == 0 else "no negative"
                log(
                    f"warning: the {name} set holds {kind} sample for {which} "
                    f"({len(labels)} samples): too few patients or annotations for this task"
                )


def _studies_of(cache, patients, cfg) -> list[str]:
    wanted = set(patients)
    return [
        sid
        for sid in cache.study_ids
        if cache.meta(sid)["patient_id"] in wanted
        and study_label(cache.meta(sid), cfg.task, cfg.sign) is not None
    ]


def _data_record(cache: ProjectionCache, studies: dict[str, list[str]]) -> dict:
    """What a run trains and is scored on: the cache's preprocessing config and, per set, each
    study with a digest of its labels (cpa, survival, sub-region flags)."""

    def digest(value) -> str:
        text = json.dumps(to_jsonable(value), sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()

    def labels(sid):
        meta = cache.meta(sid)
        return {k: meta.get(k) for k in ("patient_id", "cpa", "survival_2y", "annotations")}

    return {
        "preprocessing": digest(dataclasses.asdict(cache.config)),
        "studies": {
            name: {sid: digest(labels(sid)) for sid in ids} for name, ids in studies.items()
        },
    }


def _check_or_record_data(path: Path, split: dict, record: dict) -> None:
    """Refuse to resume on other data than the run began with (split.json keeps patients only,
    so scans added to the manifest, relabelled or re-preprocessed would join silently)."""
    if "data" not in split:  # a new run (or one from before 2026-11-22): record what it uses
        split["data"] = record
        _write_json_atomic(path, split)
        return
    old, problems = split["data"], []
    if old["preprocessing"] != record["preprocessing"]:
        problems.append("the cache was preprocessed with another configuration")
    new_patients = sorted(set(record["unassigned"]) - set(old.get("unassigned", [])))
    if new_patients:
        problems.append(f"new patients {', '.join(new_patients[:5])} in no set")
    for name, now in record["studies"].items():
        before = old["studies"].get(name, {})
        for what, ids in (
            ("new", sorted(set(now) - set(before))),
            ("missing", sorted(set(before) - set(now))),
            ("relabelled", sorted(s for s in set(now) & set(before) if now[s] != before[s])),
        ):
            if ids:
                problems.append(f"{what} {name} studies {', '.join(ids[:5])}")
    if problems:
        raise WorkdirError(
            f"{path.parent} began on other data: {'; '.join(problems)}; use another --workdir "
            "for the changed cohort"
        )


def _load_or_make_split(cfg, cache, workdir) -> dict:
    path = workdir / "split.json"
    if path.is_file():
        return read_split(path)
    studies = _studies_of(cache, {cache.meta(s)["patient_id"] for s in cache.study_ids}, cfg)
    if cfg.task == "survival" and cfg.init_from:
        split = _survival_split(cfg, {cache.meta(s)["patient_id"] for s in studies})
        # Paper 3.3: no validation set, whatever the share; training and test must hold patients.
        train_share, _, test_share = cfg.survival_split_fractions
        check_split(split, (train_share, 0.0, test_share), "--survival-split-fractions")
        _write_json_atomic(path, split)
        return split
    fractions = cfg.survival_split_fractions if cfg.task == "survival" else cfg.split_fractions
    split = split_by_patient(
        [cache.meta(s)["patient_id"] for s in studies],
        [study_label(cache.meta(s), cfg.task, cfg.sign) for s in studies],
        fractions=fractions,
        seed=cfg.seed,
    )
    flag = "--survival-split-fractions" if cfg.task == "survival" else "--split-fractions"
    check_split(split, fractions, flag)  # before split.json: a refused split leaves nothing
    split["seed"] = cfg.seed
    _write_json_atomic(path, split)
    return split


def _survival_split(cfg, patients: set[str]) -> dict:
    """Survival patients split as the disease run of ``--init-from`` split them: its test
    patients are the survival test set, its training and validation patients (and any it did
    not see) the survival training set; no validation set (paper 3.3). Split independently,
    the survival test held patients the disease network had been trained on."""
    source = _init_from_split(Path(cfg.init_from))
    test = patients & set(source["test"])
    return {
        "train": sorted(patients - test),
        "val": [],
        "test": sorted(test),
        "seed": cfg.seed,
        "from": str(cfg.init_from),
    }


def _train_epoch(cfg, model, optimizer, batches, spec, frozen, epoch, batch_size, mesh) -> dict:
    train_step = make_train_step(spec)
    order = epoch_order(batches.rotations, cfg.rotations_per_epoch, seed=cfg.seed, epoch=epoch)
    n_steps = len(order) // batch_size
    if n_steps == 0:
        raise BatchTooLargeError(
            f"{len(order)} training samples are fewer than one batch of {batch_size}: lower "
            f"--batch-size, in a new --workdir ({cfg.workdir} records batch size {cfg.batch_size})"
        )
    set_train_mode(model, frozen)
    losses, probs, labels = [], [], []
    start = time.perf_counter()
    bar = tqdm(
        batches.iterate(order, batch_size),
        total=n_steps,
        desc=f"epoch {epoch}",
        leave=False,
        unit="batch",
        disable=None,
    )
    for step, (images, y) in enumerate(bar):
        key = jax.random.fold_in(jax.random.key(cfg.seed), epoch * 1_000_003 + step)
        loss, p = train_step(model, optimizer, images, y, key)
        losses.append(loss)
        probs.append(p)
        labels.append(y)
        if step % 10 == 9:  # sync rarely: checking every step would stall the device queue
            _check_finite(losses[-10:], epoch, step)
            bar.set_postfix(
                loss=f"{float(losses[-1]):.4f}",
                img_s=f"{(step + 1) * batch_size / (time.perf_counter() - start):.0f}",
            )
    bar.close()
    _check_finite(losses, epoch, n_steps)
    seconds = time.perf_counter() - start
    probs = np.concatenate([to_host(p) for p in probs])
    labels = np.concatenate([to_host(y) for y in labels])
    metrics = binary_metrics(labels.ravel(), probs.ravel())
    return {
        "epoch": epoch,
        "train_loss": float(np.mean(jax.device_get(losses))),
        **{f"train_{k}": metrics[k] for k in ("accuracy", "precision", "recall", "f1", "auc")},
        "images_per_s": n_steps * batch_size / seconds,
        "seconds": seconds,
    }


def epoch_order(rotations: np.ndarray, per_epoch: int | None, *, seed: int, epoch: int):
    """Shuffled sample indices of one epoch, seeded by (seed, epoch) so a resumed run repeats it.

    With ``per_epoch`` only the samples of that many randomly drawn rotations (of the 27, paper
    2.3) take part in this epoch.
    """
    rng = np.random.default_rng([seed, epoch])
    index = np.arange(len(rotations))
    if per_epoch is not None:
        chosen = rng.choice(np.unique(rotations), size=per_epoch, replace=False)
        index = index[np.isin(rotations, chosen)]
    return rng.permutation(index)


def _check_finite_parameters(model, epoch: int) -> None:
    # Weights and BatchNorm running statistics (a NaN variance would be checkpointed and only
    # show as NaN validation losses). Per addressable shard: across processes a replicated array
    # is not fully addressable.
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    shards = [data for leaf in jax.tree.leaves(state) for data in _local_values(leaf)]
    if not all(bool(jax.numpy.isfinite(data).all()) for data in shards):
        raise NonFiniteLossError(
            f"non-finite weights after epoch {epoch} (not checkpointed); lower the learning rate "
            "(--learning-rate) or clip gradients (--grad-clip-norm)"
        )


def _local_values(leaf) -> list:
    """This process's pieces of a (possibly sharded) array; a host array is one piece."""
    if hasattr(leaf, "addressable_shards"):
        return [shard.data for shard in leaf.addressable_shards]
    return [leaf]


def _check_finite(losses, epoch, step) -> None:
    values = np.asarray(jax.device_get(losses), dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise NonFiniteLossError(
            f"non-finite training loss at epoch {epoch}, step <= {step}: {values[-5:]}; "
            "lower the learning rate (--learning-rate) or check the input cache"
        )


def predict(model, spec: StepSpec, samples: SampleSet, mesh, batch_size: int = 64):
    """Per-sample losses and P(positive) of ``samples`` in eval mode (padded to whole batches)."""
    model.eval()
    eval_step = make_eval_step(spec)
    batch_size = _global_batch_size(batch_size, mesh.size)
    sharding = NamedSharding(mesh, P("data"))
    losses, probs = [], []
    for start in range(0, len(samples), batch_size):
        images, labels = (
            samples.images[start : start + batch_size],
            samples.labels[start : start + batch_size],
        )
        n = len(labels)
        pad = batch_size - n
        images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
        labels = np.concatenate([labels, np.zeros((pad, *labels.shape[1:]), labels.dtype)])
        loss, p = eval_step(model, *to_global((images, labels), sharding))
        losses.append(to_host(loss)[:n])
        probs.append(to_host(p)[:n])
    return np.concatenate(losses), np.concatenate(probs)


def evaluate_samples(model, spec, samples, mesh) -> dict:
    losses, probs = predict(model, spec, samples, mesh)
    metrics = binary_metrics(samples.labels.ravel(), probs.ravel())
    return {
        "loss": float(losses.mean()),
        **{k: metrics[k] for k in ("accuracy", "precision", "recall", "f1", "auc")},
    }


def write_test_predictions(model, spec, test: SampleSet, mesh, workdir: Path) -> dict:
    """Predict the held-out test patients with the best model; save predictions, return metrics."""
    _, probs = predict(model, spec, test, mesh)
    if not is_primary():
        return binary_metrics(test.labels.ravel(), probs.ravel())
    with atomic_path(workdir / "predictions_test.npz", suffix=".npz") as tmp:
        np.savez(
            tmp,
            probs=probs,
            labels=test.labels,
            study_ids=test.study_ids.astype(str),
            patient_ids=test.patient_ids.astype(str),
            subregions=test.subregions,
            rotations=test.rotations,
        )
    return binary_metrics(test.labels.ravel(), probs.ravel())


def _num_classes(cfg) -> int:
    return len(SIGNS) if cfg.multi_label else 2


def _step_spec(cfg, train_set: SampleSet, preprocessing: str) -> StepSpec:
    native = train_set.images.shape[1:3]
    minimum = MIN_INPUT_SIZE[cfg.arch]
    size = cfg.image_size or tuple(max(int(n), minimum) for n in native)
    multi_label = cfg.multi_label
    return StepSpec(
        image_size=tuple(int(n) for n in size),
        preprocessing=preprocessing,
        multi_label=multi_label,
        positive_weight=positive_weights(train_set.labels) if multi_label else None,
        max_rotation_deg=cfg.max_rotation_deg,
        zoom_range=tuple(cfg.zoom_range),
        flip=cfg.flip,
    )


def positive_weights(labels: np.ndarray) -> tuple[float, ...]:
    """``n_negative / n_positive`` of each sign (column) of multi-label training ``labels``.

    Paper 2.3 balances the classes after the split; one multi-label sample set cannot be
    balanced for three signs at once, so the loss weighs each sign's positives instead. Without
    it the rare fungus balls were called at recall 0.09 (p >= 0.5) by a network whose AUC was
    0.99 (README, "Measured"). A sign without positives keeps weight 1.
    """
    labels = np.asarray(labels).reshape(len(labels), -1)
    positives = labels.sum(0)
    negatives = len(labels) - positives
    return tuple(float(n / p) if p else 1.0 for n, p in zip(negatives, positives, strict=True))


def _global_batch_size(batch_size: int, n_devices: int) -> int:
    """Round the batch up to a multiple of the device count so it shards evenly."""
    return int(math.ceil(batch_size / n_devices) * n_devices)


def _replicate(nodes, sharding) -> None:
    """Place the state of ``nodes`` on every device of ``sharding`` (a replicated sharding).

    Across processes ``device_put`` cannot reach the other hosts' devices; every process holds
    the same state (same seed or checkpoint), so each contributes its copy.
    """
    state = nnx.state(nodes)
    if jax.process_count() == 1:
        nnx.update(nodes, jax.device_put(state, sharding))
        return

    def replicated(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # RNG keys travel as raw data
            data = jax.make_array_from_process_local_data(
                sharding, np.asarray(jax.random.key_data(x))
            )
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    nnx.update(nodes, jax.tree.map(replicated, state))


# What a rerun in the same workdir may change: how long it trains, where its inputs and logs
# are, how the report is made. Anything else (data, split, model, optimisation) would resume a
# different run from this one's checkpoint.
RESUMABLE_CHANGES = frozenset(
    ("epochs", "workdir", "data_dir", "manifest", "cache", "backend", "bootstrap", "cam_method")
    + ("cam_layer", "tensorboard", "preprocess_preset")
)
# The cache may move with its manifest or data folder, and a --cache run records the cache's own
# preprocessing preset (train): what the cache holds is checked on its own (split.json "data":
# preprocessing config, studies and labels per set, _check_or_record_data).


def _check_or_write_config(cfg: TrainConfig, workdir: Path) -> None:
    """Refuse to resume a workdir that holds a different run (other task, axis, data, ...)."""
    _check_config(cfg, workdir)
    _write_json_atomic(workdir / "config.json", json.loads(cfg.to_json()))


def _check_config(cfg: TrainConfig, workdir: Path) -> None:
    """Raise WorkdirError when ``workdir`` holds a run whose config differs from ``cfg`` in more
    than what a rerun may change (RESUMABLE_CHANGES)."""
    path = workdir / "config.json"
    if path.is_file():
        old = read_run_config(path)
        diff = [
            f"{f.name}: {getattr(old, f.name)!r} != {getattr(cfg, f.name)!r}"
            for f in fields(TrainConfig)
            if f.name not in RESUMABLE_CHANGES and getattr(old, f.name) != getattr(cfg, f.name)
        ]
        if diff:
            raise WorkdirError(
                f"{path} belongs to a different run ({'; '.join(diff)}); use another --workdir"
            )


_REMEDY = "restore it (or train in a new --workdir)"


def read_run_json(path: Path, *, remedy: str = _REMEDY, what: str = ""):
    """A run folder's JSON file (config.json, run.json, split.json); a damaged one is a WorkdirError
    naming it, not a bare JSONDecodeError."""
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise WorkdirError(f"{what}{path} is damaged ({err}); {remedy}") from err


def read_split(path: Path, *, remedy: str = _REMEDY, what: str = "") -> dict:
    """A run's split.json: patient lists "train", "val" and "test" (and what else it records);
    an edited or truncated one is a WorkdirError naming it, not a KeyError deep in training."""
    split = read_run_json(path, remedy=remedy, what=what)
    sets = ("train", "val", "test")
    if not isinstance(split, dict) or not all(
        isinstance(split.get(name), list) and all(isinstance(p, str) for p in split[name])
        for name in sets
    ):
        raise WorkdirError(
            f"{what}{path} is damaged (it must hold the patient-id lists {', '.join(sets)}); "
            f"{remedy}"
        )
    return split


def read_run_config(path: Path) -> TrainConfig:
    value = read_run_json(path)
    try:
        return TrainConfig.from_dict(value)
    except (TypeError, ValueError, AttributeError, KeyError) as err:
        raise WorkdirError(f"{path} is damaged ({err}); {_REMEDY}") from err


def _write_json_atomic(path: Path, value) -> None:
    """Write ``value`` as JSON through a temporary file (first process only, see fit)."""
    if not is_primary():
        return
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True, default=str))


def _append_metrics(path: Path, record: dict) -> None:
    if not is_primary():
        return
    with open(path, "a") as fh:
        # Strict JSON lines (jq, JavaScript): undefined metrics are null, as in report.json.
        fh.write(json.dumps(nonfinite_to_null(record), allow_nan=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _truncate_metrics(path: Path, last_epoch: int) -> None:
    """Drop metric lines of epochs after the restored checkpoint (they will be redone)."""
    if not is_primary() or not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    try:
        json.loads(lines[-1] if lines else "{}")
    except ValueError:
        # Cut off mid-write (kill -9, disk full): its epoch was not checkpointed (the line comes
        # first, see fit), so it is redone like the other lines dropped here.
        lines.pop()
    kept = [ln for ln in lines if json.loads(ln)["epoch"] <= last_epoch]
    atomic_write_text(path, "".join(ln + "\n" for ln in kept))


def _tensorboard_writer(workdir: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError as err:
        raise ImportError(
            "--tensorboard needs tensorboardX: pip install -e '.[tensorboard]'"
        ) from err
    return SummaryWriter(str(workdir / "tensorboard"))


def _log_tensorboard(writer, record: dict) -> None:
    """Every numeric metric of the epoch as a scalar (train_* and val_* side by side)."""
    for name, value in record.items():
        if name != "epoch" and isinstance(value, int | float) and math.isfinite(value):
            writer.add_scalar(name.replace("_", "/", 1), value, record["epoch"])
    writer.flush()


def _epoch_line(name: str, r: dict) -> str:
    """One line per epoch; an undefined F1 or AUC (a set without positives) shows as n/a."""
    val = (
        f" val_f1 {format_score(r['val_f1'])} val_auc {format_score(r['val_auc'])}"
        if "val_f1" in r
        else ""
    )
    return (
        f"[{name}] epoch {r['epoch']}: loss {r['train_loss']:.4f} "
        f"train_f1 {format_score(r['train_f1'])}{val} ({r['images_per_s']:.0f} img/s)"
    )
