"""Architecture names (as recorded in weights.json and used by configs) -> models.

`build_model` and `convert_weights` skip the random initialisation of a backbone whose weights
are loaded anyway: the backbone is created abstractly (`nnx.eval_shape`) and filled from the file.
"""

from pathlib import Path

from flax import nnx

from ._checkpoint import check_output_dir, load_weights, save_weights
from ._head import ClassifierHead
from ._inception import INCEPTION_MIN_INPUT_SIZE, InceptionV3
from ._vgg import VGG16, VGG19, vgg_min_input_size
from ._weights import load_keras_weights, load_torchvision_weights, require_weights_file

ARCHITECTURES = {"vgg19": VGG19, "vgg16": VGG16, "inception_v3": InceptionV3}
# Smallest image side each architecture takes (model.min_input_size, without building one).
MIN_INPUT_SIZE = {
    "vgg19": vgg_min_input_size(VGG19.keywords["stages"]),
    "vgg16": vgg_min_input_size(VGG16.keywords["stages"]),
    "inception_v3": INCEPTION_MIN_INPUT_SIZE,
}
LOADERS = {"keras": load_keras_weights, "torchvision": load_torchvision_weights}


def _constructor(arch: str):
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def _abstract_backbone(arch: str, num_classes: int, rngs: nnx.Rngs, **kwargs):
    """The model with shape-only backbone arrays (to be loaded) and a real, random head."""
    constructor = _constructor(arch)
    model = nnx.eval_shape(lambda: constructor(num_classes, rngs=nnx.Rngs(0), **kwargs))
    fc1 = model.head.fc1
    model.head = ClassifierHead(
        fc1.in_features,
        num_classes,
        units=fc1.out_features,
        dropout_rate=model.head.dropout.rate,
        dtype=fc1.dtype,
        param_dtype=fc1.param_dtype,
        rngs=rngs,
    )
    return model


def _load_any(model, weights) -> str:
    """A weights directory (save_weights / convert_weights), a Keras .h5 or a torchvision file."""
    weights = require_weights_file(weights, model.arch)  # missing: say what to download
    if weights.is_dir():
        return load_weights(model, weights)
    if weights.suffix in (".h5", ".hdf5", ".keras"):  # .keras: refused with what to do
        return load_keras_weights(model, weights)
    if weights.suffix in (".pth", ".pt", ".safetensors"):
        return load_torchvision_weights(model, weights)
    raise ValueError(
        f"cannot tell the format of {weights}: expected a weights directory, "
        ".h5 (Keras) or .pth / .safetensors (torchvision)"
    )


def build_model(arch: str, num_classes: int = 2, *, rngs: nnx.Rngs, weights=None, **kwargs):
    """``build_model("vgg19", 2, rngs=nnx.Rngs(0), weights=DIR, width=...)``.

    ``weights``: a directory from `save_weights` / scripts/convert_weights.py, a Keras ``.h5``
    or a torchvision ``.pth`` / ``.safetensors``; the backbone is then never randomly
    initialised (fast on CPU) and the weights' input convention is ``model.preprocessing``.
    """
    if weights is None:
        return _constructor(arch)(num_classes, rngs=rngs, **kwargs)
    model = _abstract_backbone(arch, num_classes, rngs, **kwargs)
    _load_any(model, weights)
    return model


def convert_weights(arch: str, source: str, input_path, output_dir, *, overwrite=False) -> Path:
    """Published ImageNet weights (``source`` "keras" or "torchvision") -> a weights directory
    for `load_weights` / `build_model(weights=...)`; backbone only (the head is not saved)."""
    if source not in LOADERS:
        raise ValueError(f"source must be one of {sorted(LOADERS)}, got {source!r}")
    input_path = require_weights_file(input_path, arch)
    check_output_dir(output_dir)
    if not overwrite and Path(output_dir).exists():  # before the conversion, not after it
        raise FileExistsError(f"{output_dir} exists (overwrite=True replaces it)")
    model = _abstract_backbone(arch, 2, nnx.Rngs(0))
    preprocessing = LOADERS[source](model, input_path)
    return save_weights(
        model,
        output_dir,
        preprocessing,
        source=input_path.name,
        include_head=False,
        overwrite=overwrite,
    )
