"""Building the network of a run, and loading a trained run back (for Grad-CAM and reports)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from sapsam_jax.train._config import TrainConfig

# Without ImageNet weights the input convention is ours to choose: Keras Inception's [-1, 1]
# centres the [0, 1] projections, which helps training from scratch.
DEFAULT_PREPROCESSING = "tf"
# Model settings that ImageNet weights can switch (torchvision Inception), kept in run.json.
CONVENTIONS = ("bn_scale", "pool_include_pad")


def new_model(cfg: TrainConfig, num_classes: int, rngs: nnx.Rngs):
    """A freshly initialised network of the run's architecture, width, head and dtype."""
    from sapsam_jax.models import VGG19, InceptionV3

    return {"vgg19": VGG19, "inception_v3": InceptionV3}[cfg.arch](
        num_classes,
        rngs=rngs,
        width=cfg.width,
        dtype=jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32,
        head_units=cfg.head_units,
        dropout_rate=cfg.dropout_rate,
    )


def build_model(cfg: TrainConfig, *, num_classes: int, seed: int):
    """The run's network and its input convention, with ImageNet or disease weights if asked.

    ``cfg.weights`` (a converted ImageNet checkpoint, scripts/convert_weights.py) fills the
    backbone and fixes the input preprocessing; ``cfg.init_from`` (a disease workdir, survival
    task, paper 2.4) takes the whole trained network and re-draws the last two dense layers.
    """
    model = new_model(cfg, num_classes, nnx.Rngs(params=seed, dropout=seed + 1))
    preprocessing = DEFAULT_PREPROCESSING
    if cfg.init_from:
        source = load_trained(cfg.init_from)
        check_same_network(cfg, source.config)
        # The source's conventions first (torchvision Inception: BN scale, padded pools), or its
        # parameters do not fit this model's structure.
        conventions = {k: source.model.config[k] for k in CONVENTIONS if k in source.model.config}
        if conventions:
            model.set_conventions(**conventions)
        nnx.update(model, nnx.state(source.model, nnx.Any(nnx.Param, nnx.BatchStat)))
        model.reset_head(nnx.Rngs(params=seed + 2), last=2)
        preprocessing = source.preprocessing
    elif cfg.weights:
        from sapsam_jax.models import load_weights

        preprocessing = load_weights(model, cfg.weights)
    return model, preprocessing


# What --init-from must share with the run it starts from: nnx.update takes any shapes, so a
# mismatch would train (and record in config.json) a network other than the one described.
SAME_NETWORK_FIELDS = ("arch", "width", "head_units")


def check_same_network(cfg: TrainConfig, there: TrainConfig, error=ValueError) -> None:
    """Raise ``error`` when the ``--init-from`` run's config ``there`` describes another network."""
    diff = [
        f"{name} {getattr(there, name)!r} there, {getattr(cfg, name)!r} here"
        for name in SAME_NETWORK_FIELDS
        if getattr(there, name) != getattr(cfg, name)
    ]
    if diff:
        raise error(
            f"--init-from {cfg.init_from} is another network ({'; '.join(diff)}); "
            "train the survival run with the disease run's settings"
        )


@dataclass
class TrainedRun:
    """A finished (or interrupted) training run loaded from its workdir."""

    workdir: Path
    config: TrainConfig
    model: nnx.Module  # best-on-validation weights, eval mode
    preprocessing: str
    image_size: tuple[int, int]
    multi_label: bool
    split: dict
    cache: object  # ProjectionCache

    @property
    def step_spec(self):
        from sapsam_jax.train._step import StepSpec

        return StepSpec(self.image_size, self.preprocessing, self.multi_label, augment=False)


def load_trained(workdir, which: str = "best") -> TrainedRun:
    """Load the run in ``workdir`` with its ``best`` (or ``latest``) checkpoint, in eval mode."""
    from sapsam_jax.data import ProjectionCache
    from sapsam_jax.train._checkpoint import RunCheckpoints
    from sapsam_jax.train._loop import WorkdirError, read_run_config, read_run_json, read_split

    workdir = Path(workdir)
    for name in ("config.json", "run.json", "split.json"):
        if not (workdir / name).is_file():
            raise FileNotFoundError(f"{workdir} is not a training workdir: {name} is missing")
    cfg = read_run_config(workdir / "config.json")
    run = read_run_json(workdir / "run.json")
    if not isinstance(run, dict) or not isinstance(run.get("num_classes"), int):
        raise WorkdirError(f"{workdir / 'run.json'} is damaged (no num_classes); restore it")
    model = new_model(cfg, run["num_classes"], nnx.Rngs(params=0, dropout=1))
    if run.get("model_conventions"):
        model.set_conventions(**run["model_conventions"])
    ckpts = RunCheckpoints(workdir)
    meta = ckpts.restore_best(model) if which == "best" else _restore_latest_model(ckpts, model)
    ckpts.close()
    if meta is None:
        raise FileNotFoundError(f"{workdir} holds no checkpoint yet")
    model.eval()
    split = read_split(workdir / "split.json")
    return TrainedRun(
        workdir=workdir,
        config=cfg,
        model=model,
        preprocessing=run["preprocessing"],
        image_size=tuple(run["image_size"]),
        multi_label=run["multi_label"],
        split=split,
        cache=ProjectionCache(cfg.cache, studies=manifest_study_ids(cfg)),
    )


def manifest_study_ids(cfg: TrainConfig) -> list[str] | None:
    """The studies of the run's manifest, as training opened its cache (studies an edited
    manifest dropped stay in the cache folder); None (the whole folder) for the synthetic cohort,
    ``--cache`` runs, or a manifest no longer there."""
    if not cfg.manifest or not Path(cfg.manifest).is_file():
        return None
    from sapsam_jax.io import read_manifest

    return [study.study_id for study in read_manifest(cfg.manifest, check_files=False)]


def trained_studies(split: dict) -> list[str] | None:
    """The studies a run was trained, validated and tested on (split.json's data record): what a
    rebuild of its test predictions reads, whatever the cache folder or manifest holds now; None
    (every study) for runs recorded before 2026-11-22."""
    data = split.get("data")
    if not data:
        return None
    return sorted({sid for ids in data["studies"].values() for sid in ids})


def _restore_latest_model(ckpts, model):
    import orbax.checkpoint as ocp

    from sapsam_jax.train._checkpoint import MODEL_STATE, _assign

    step = ckpts.latest.latest_step()
    if step is None:
        return None
    state = nnx.state(model, MODEL_STATE)
    restored = ckpts.latest.restore(
        step,
        args=ocp.args.Composite(
            model=ocp.args.StandardRestore(nnx.to_pure_dict(state)), meta=ocp.args.JsonRestore()
        ),
    )
    _assign(model, state, restored["model"])
    return dict(restored["meta"])


def model_inputs(run: TrainedRun, images) -> jnp.ndarray:
    """Cache images ((N, H, W) gray, (N, H, W, 1|3), values in [0, 1]) -> the run's model input."""
    from sapsam_jax.train._step import prepare_inputs

    images = jnp.asarray(images, jnp.float32)
    if images.ndim == 3:
        images = images[..., None]
    return prepare_inputs(images, run.step_spec)
