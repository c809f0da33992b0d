"""``python scripts/train.py``: flags -> TrainConfig -> train().

Every TrainConfig field is a flag (``--learning-rate``, ``--frozen-blocks``,
``--image-size 224 224``, ...), so any hyper-parameter of a preset can be overridden from the
command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing

from sapsam_jax.config import AXES
from sapsam_jax.train._config import (
    ARCHS,
    BALANCE_MODES,
    SELECT_BY,
    SIGN_CHOICES,
    TASKS,
    TEST_BALANCE,
    TrainConfig,
    preset_config,
    resolve_preset,
)

_CHOICES = {
    "task": TASKS,
    "axis": tuple(AXES),
    "arch": ARCHS,
    "sign": SIGN_CHOICES,
    "dtype": ("float32", "bfloat16"),
    "optimizer": ("sgd", "adam"),
    "train_balance": BALANCE_MODES,
    "test_balance": TEST_BALANCE,
    "eval_rotations": ("all", "identity"),
    "select_by": SELECT_BY,
    "backend": ("auto", "cpu", "gpu"),
}
_NOT_FLAGS = {"synthetic", "preset"}
# Optional fields whose None means something a preset may have overridden (no clipping, every
# rotation each epoch, the native image size, the task's epoch count, the default map layer):
# their flags take the word "none" to set it back. What None means, for --help:
_NONE_MEANS = {
    "image_size": "the projections' own size",
    "grad_clip_norm": "no clipping",
    "rotations_per_epoch": "all 27 every epoch",
    "epochs": "the paper's count for the task",
    "cam_layer": "the architecture's last convolution",
}
_NONE_WORD = "none"


class _Reset:
    """What a resettable flag's parser returns for ``none`` (argparse's None means 'not given')."""

    def __repr__(self) -> str:
        return _NONE_WORD


RESET = _Reset()


def _or_none(base):
    """``base`` as an argparse type that also takes ``none`` (-> RESET)."""

    def parse(text: str):
        return RESET if text.strip().lower() == _NONE_WORD else base(text)

    parse.__name__ = base.__name__  # argparse names the type in its "invalid int value" errors
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/train.py",
        description="Train SAPSAM networks (paper 2.4, 3.1-3.3). With no --manifest/--cache the "
        "built-in synthetic cohort is generated, preprocessed and used.",
    )
    parser.add_argument(
        "--preset",
        default="auto",
        choices=("auto", "paper", "quick", "tiny"),
        help="auto: paper when JAX sees an accelerator, quick otherwise",
    )
    parser.add_argument("--patients", type=int, help="synthetic cohort size (no data given)")
    parser.add_argument(
        "--control-fraction",
        type=float,
        help="share of control patients in the synthetic cohort (default 0.25, about the "
        "paper's share; 0.5 for the quick disease task)",
    )
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        if field.name not in _NOT_FLAGS:
            _add_field_flag(parser, field.name, hints[field.name])
    return parser


def _add_field_flag(parser, name: str, hint) -> None:
    flag = "--" + name.replace("_", "-")
    base = hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None -> X
        base = next(a for a in typing.get_args(hint) if a is not type(None))
    kwargs: dict = {"default": None, "dest": name}
    if typing.get_origin(base) is tuple:  # tuple[int, int], tuple[float, ...]
        kwargs |= {"nargs": "+", "type": typing.get_args(base)[0]}
    elif base is bool:
        kwargs |= {"action": argparse.BooleanOptionalAction}
    else:
        kwargs["type"] = base
    if name in _CHOICES:
        kwargs["choices"] = _CHOICES[name]
    kwargs["help"] = _preset_values(name)
    if name in _NONE_MEANS:
        kwargs["type"] = _or_none(kwargs["type"])
        kwargs["help"] += f" ({_NONE_WORD}: {_NONE_MEANS[name]})"
    parser.add_argument(flag, **kwargs)


def _unset_resets(name: str, value):
    """A flag's parsed value with ``none`` turned into None; ``none`` among numbers
    (``--image-size none 64``) is refused."""
    if isinstance(value, list) and any(v is RESET for v in value):
        if len(value) != 1:
            raise ValueError(f"--{name.replace('_', '-')} takes {_NONE_WORD} alone, not {value}")
        return None
    return None if value is RESET else value


def _preset_values(name: str) -> str:
    """What the presets set a field to for each task (the flag overrides it), for --help."""
    if name == "task":  # the one field that picks the task instead of varying with it
        return f"default: {TrainConfig.task}"
    paper, quick = _per_task("paper", name), _per_task("quick", name)
    if paper == quick:
        return f"default: {paper}"
    return f"paper preset: {paper}; quick: {quick}"


def _per_task(preset: str, name: str) -> str:
    """``name``'s value under ``preset``, one per task where the tasks differ (preset_config)."""
    from sapsam_jax.train._config import TASKS

    field = "num_epochs" if name == "epochs" else name  # epochs None: the task's own count
    values = {task: getattr(preset_config(preset, task), field) for task in TASKS}
    if len(set(map(repr, values.values()))) == 1:
        return str(values[TASKS[0]])
    return " / ".join(f"{value} {task}" for task, value in values.items())


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, str]:
    """The preset for ``--preset``/``--task`` with every given flag applied on top."""
    task = args.task or "signs"
    preset, reason = resolve_preset(args.preset)
    cfg = preset_config(preset, task)
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if f.name not in _NOT_FLAGS and getattr(args, f.name) is not None
    }
    for key, value in overrides.items():
        value = _unset_resets(key, value)
        overrides[key] = tuple(value) if isinstance(value, list) else value
    synthetic = {"n_patients": args.patients, "control_fraction": args.control_fraction}
    synthetic = {k: v for k, v in synthetic.items() if v is not None}
    if synthetic:
        overrides["synthetic"] = dataclasses.replace(cfg.synthetic, **synthetic)
    if args.manifest and args.cache:
        raise ValueError("give --manifest (preprocessed into a cache) or --cache, not both")
    if overrides.get("arch", cfg.arch) != cfg.arch and "cam_layer" not in overrides:
        overrides["cam_layer"] = None  # the preset's map layer belongs to its own architecture
    if args.weights:
        reason += _adopt_weights_network(args.weights, cfg, overrides)
    return cfg.replace(**overrides), reason


def _adopt_weights_network(directory, cfg: TrainConfig, overrides: dict) -> str:
    """Take the architecture and width of converted ImageNet weights (full width; the quick
    preset's network is 1/8 wide) unless the flags set them; refuse what training cannot use,
    before any preprocessing. Returns what it adds to the preset line."""
    from sapsam_jax.models import read_weights_info
    from sapsam_jax.train._config import ARCHS

    info = read_weights_info(directory)
    arch, width = info["arch"], float(info["config"]["width"])
    if arch not in ARCHS:
        raise ValueError(
            f"--weights {directory} holds {arch} weights; training builds {' or '.join(ARCHS)}"
        )
    said = ""
    if "arch" in overrides and overrides["arch"] != arch:
        raise ValueError(
            f"--weights {directory} holds {arch} weights, not --arch {overrides['arch']}"
        )
    if arch != cfg.arch and "arch" not in overrides:
        overrides["arch"] = arch
        overrides.setdefault("cam_layer", None)  # the preset's map layer is its own arch's
        said += f"; arch {arch} from --weights (the preset's is {cfg.arch})"
    if width != cfg.width and "width" not in overrides:
        overrides["width"] = width
        said += f"; width {width:g} from --weights (the preset's is {cfg.width:g})"
    return said


def parse_config(argv=None) -> tuple[TrainConfig, str] | int:
    """The run's config and the line saying which preset, or 2 after an error line: what a user
    can fix (a path, a manifest, a flag) is one error line and exit status 2, not a traceback."""
    from sapsam_jax.data._cache import CacheError
    from sapsam_jax.io import ManifestError
    from sapsam_jax.train._loop import check_cam_layer, planned_runs

    args = build_parser().parse_args(argv)
    try:
        cfg, reason = config_from_args(args)
        check_cam_layer(cfg)  # a mistyped --cam-layer: an error line, not train()'s traceback
        planned_runs(cfg)  # survival: --survival-split-fractions leaving its disease run no data
        return cfg, reason
    except (ValueError, FileNotFoundError, FileExistsError, CacheError, ManifestError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
