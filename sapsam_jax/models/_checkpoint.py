"""Converted / trained weights as an Orbax checkpoint plus a JSON record of what they are.

Layout of a weights directory::

    DIR/weights.json   {"format": 1, "arch", "config", "preprocessing", "source", "has_head", ...}
    DIR/state/         Orbax StandardCheckpointer tree of the Param and BatchStat arrays

The directory is written under a temporary name and renamed when complete (atomic). The JSON
records the preprocessing convention and the model conventions (``pool_include_pad``,
``bn_scale``) the arrays belong to, and `load_weights` re-applies them.
"""

import datetime
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

from ._inception import InceptionV3
from ._preprocess import PREPROCESSING
from ._weights import assign_backbone, model_arrays

WEIGHTS_JSON = "weights.json"
STATE_DIR = "state"
FORMAT_VERSION = 1
CONVENTIONS = ("pool_include_pad", "bn_scale")


def _nest(flat: dict) -> dict:
    tree = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _flatten(tree: dict, prefix=()) -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


def check_output_dir(directory) -> None:
    """Refuse an output that exists as something other than a directory: ``overwrite`` replaces a
    weights directory, never a file (such as the downloaded weights themselves)."""
    if Path(directory).exists() and not Path(directory).is_dir():
        raise ValueError(f"{directory} exists and is not a directory; choose another output")


def _replace_dir(tmp: Path, directory: Path, overwrite: bool) -> None:
    if directory.exists():
        if not overwrite:
            raise FileExistsError(f"{directory} exists (overwrite=True replaces it)")
        old = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(directory, old)
        os.rename(tmp, directory)
        shutil.rmtree(old)
    else:
        os.rename(tmp, directory)


def save_weights(
    model,
    directory,
    preprocessing: str | None = None,
    *,
    source=None,
    include_head: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write the model's parameters and batch statistics to ``directory`` (atomically).

    ``include_head=False`` saves the backbone only (converted ImageNet weights have no head).
    ``preprocessing`` (the input convention recorded with the weights) defaults to the model's
    own (``model.preprocessing``, set by the weight loaders).
    """
    if preprocessing is None:
        preprocessing = model.preprocessing
    if preprocessing not in PREPROCESSING:
        raise ValueError(f"preprocessing must be one of {PREPROCESSING}, got {preprocessing!r}")
    check_output_dir(directory)
    directory = Path(directory).absolute()
    arrays = {
        p: np.asarray(v[...])
        for p, v in model_arrays(model).items()
        if include_head or p[0] != "head"
    }
    info = dict(
        format=FORMAT_VERSION,
        arch=model.arch,
        config=model.config,
        preprocessing=preprocessing,
        source=None if source is None else str(source),
        has_head=include_head,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp / STATE_DIR, _nest(arrays))
        (tmp / WEIGHTS_JSON).write_text(json.dumps(info, indent=2) + "\n")
        _replace_dir(tmp, directory, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def read_weights_info(directory) -> dict:
    """The JSON record of a weights directory written by `save_weights`."""
    path = Path(directory) / WEIGHTS_JSON
    if Path(directory).is_file():  # a Keras .h5 or torchvision .pth given as it was downloaded
        raise FileNotFoundError(
            f"{directory} is a file, not a weights directory: convert it first with "
            f"scripts/convert_weights.py --arch ARCH --from keras|torchvision --input {directory} "
            "--output DIR, and pass DIR"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {directory} is not a weights directory "
            "written by save_weights / scripts/convert_weights.py"
        )
    try:
        info = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:  # cut short or edited by hand
        raise ValueError(f"{path} is damaged ({err}); convert the weights again") from err
    fields = info if isinstance(info, dict) else {}
    missing = [k for k in ("arch", "config", "preprocessing") if k not in fields]
    if missing or not isinstance(fields["config"], dict):
        raise ValueError(f"{path} is damaged (no {', '.join(map(repr, missing)) or 'config'})")
    return info


def load_weights(model, directory, *, head: bool = True) -> str:
    """Restore weights saved by `save_weights` into ``model`` in place; returns the
    preprocessing convention. ``head=False`` keeps the model's own head even if one was saved.
    """
    info = read_weights_info(directory)
    config = info["config"]
    if info.get("preprocessing") not in PREPROCESSING:
        raise ValueError(
            f"{directory}/{WEIGHTS_JSON}: preprocessing {info.get('preprocessing')!r} is none of "
            f"{', '.join(PREPROCESSING)}"
        )
    if not (Path(directory) / STATE_DIR).is_dir():
        raise FileNotFoundError(
            f"{directory} has no {STATE_DIR}/ folder: an incomplete conversion; convert again"
        )
    if info["arch"] != model.arch or config.get("width") != model.width:
        raise ValueError(
            f"{directory} holds {info['arch']} width {config.get('width')}, "
            f"the model is {model.arch} width {model.width}"
        )
    with ocp.StandardCheckpointer() as checkpointer:
        arrays = _flatten(checkpointer.restore(Path(directory).absolute() / STATE_DIR))
    new = {p: (".".join(p), a) for p, a in arrays.items() if head or p[0] != "head"}
    conventions = {}
    if isinstance(model, InceptionV3):
        conventions = {k: config[k] for k in CONVENTIONS if k in config}
    assign_backbone(model, new, conventions, directory)
    model.preprocessing = info["preprocessing"]
    return model.preprocessing
