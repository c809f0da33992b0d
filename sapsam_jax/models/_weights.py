"""Published ImageNet weights -> our Flax backbones: Keras legacy HDF5 and torchvision state dicts.

Every loader first builds the complete new backbone state (checking every layer's presence and
shape), then assigns it in one go, so a bad file raises ``ValueError`` and leaves the model as it
was. Only the backbone is loaded; ImageNet classifiers ("top" layers) are ignored and the paper's
head keeps its random initialisation (paper 2.4). Loaders return the input ``preprocessing``
convention (see `preprocess_input`) that the weights expect, also set as ``model.preprocessing``.
"""

import pickle
import re
import zipfile
from pathlib import Path

import h5py
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ._inception import MIXED_NAMES, InceptionV3
from ._vgg import VGG

# (our path tuple) -> (source layer name, for error messages; array)
NewState = dict[tuple[str, ...], tuple[str, np.ndarray]]

# Published files (none is downloaded by this package; fetch them by hand, then convert).
WEIGHT_FILES = {
    ("vgg19", "keras"): "https://storage.googleapis.com/tensorflow/keras-applications/vgg19/"
    "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
    ("vgg19", "torchvision"): "https://download.pytorch.org/models/vgg19-dcbbabbd.pth",
    ("vgg16", "keras"): "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
    "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
    ("vgg16", "torchvision"): "https://download.pytorch.org/models/vgg16-397923af.pth",
    ("inception_v3", "keras"): "https://storage.googleapis.com/tensorflow/keras-applications/"
    "inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
    (
        "inception_v3",
        "torchvision",
    ): "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth",
}

TORCH_STEM = {
    "conv1a_3x3": "Conv2d_1a_3x3",
    "conv2a_3x3": "Conv2d_2a_3x3",
    "conv2b_3x3": "Conv2d_2b_3x3",
    "conv3b_1x1": "Conv2d_3b_1x1",
    "conv4a_3x3": "Conv2d_4a_3x3",
}
TORCH_MIXED = dict(
    zip(
        MIXED_NAMES,
        (
            "Mixed_5b",
            "Mixed_5c",
            "Mixed_5d",
            "Mixed_6a",
            "Mixed_6b",
            "Mixed_6c",
            "Mixed_6d",
            "Mixed_6e",
            "Mixed_7a",
            "Mixed_7b",
            "Mixed_7c",
        ),
        strict=True,
    )
)
BN_WEIGHTS = ("gamma", "beta", "moving_mean", "moving_variance")


def require_weights_file(path, arch: str) -> Path:
    """``path`` as a Path if it exists, else a FileNotFoundError saying what to download.

    Nothing is downloaded here (the training machines are offline): the message names the
    published file(s) for ``arch`` and the command converting one into an Orbax checkpoint.
    """
    if path is not None and Path(path).exists():
        return Path(path)
    options = [
        f"  - {url.rsplit('/', 1)[1]}  ({source}: {url})"
        for (a, source), url in WEIGHT_FILES.items()
        if a == arch
    ]
    if not options:
        raise FileNotFoundError(
            f"weights for {arch} not found: {path} (no published ImageNet weights are known "
            "for this architecture)"
        )
    raise FileNotFoundError(
        f"ImageNet weights for {arch} not found (looked for {path}). Nothing is downloaded "
        "automatically; fetch one of\n" + "\n".join(options) + "\nthen convert it with\n"
        f"  python scripts/convert_weights.py --arch {arch} --from keras|torchvision "
        "--input FILE --output DIR\nand pass DIR (see the README, 'ImageNet weights')."
    )


# ----------------------------------------------------------------------------- file readers


def _h5_strings(group, name: str) -> list[str]:
    """A string-list attribute, possibly chunked as name0, name1... (Keras legacy format)."""
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values, i = [], 0
        while f"{name}{i}" in group.attrs:
            values += list(group.attrs[f"{name}{i}"])
            i += 1
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def read_keras_h5(path) -> dict[str, list[tuple[str, np.ndarray]]]:
    """Layer name -> [(weight name without ':0', array)] from a legacy Keras HDF5 weights file."""
    if _is_keras_archive(path):
        raise ValueError(
            f"{path}: a Keras 3 '.keras' archive, which is not read here; load it in Keras and "
            "save the legacy HDF5 format: model.save('model.h5') (or model.save_weights with "
            "an '.h5' name in Keras 2)"
        )
    if not h5py.is_hdf5(path):
        raise ValueError(
            f"{path}: not an HDF5 file, so not Keras weights (a torchvision .pth or "
            ".safetensors file is read with --from torchvision)"
        )
    try:
        handle = h5py.File(path, "r")
    except OSError as err:  # h5py's message (a truncated file, ...) does not name the file
        raise ValueError(f"{path}: unreadable HDF5 file, truncated or corrupt ({err})") from None
    with handle as f:
        try:
            return _read_keras_layers(f, path)
        except (OSError, KeyError, RuntimeError) as err:  # damaged metadata: h5py's bare errors
            raise ValueError(f"{path}: unreadable HDF5 file, corrupt or damaged ({err})") from None


def _read_keras_layers(f, path) -> dict[str, list[tuple[str, np.ndarray]]]:
    root = f["model_weights"] if "model_weights" in f else f  # full-model saves nest it
    names = _h5_strings(root, "layer_names")
    if not names:
        raise ValueError(
            f"{path}: no 'layer_names' attribute; not a legacy Keras HDF5 weights file "
            "(a Keras 3 '.weights.h5' file is not read here; build the model in Keras, "
            "load it and save the legacy HDF5 format: model.save('model.h5'))"
        )
    layers = {}
    for name in names:
        group = root[name]
        layers[name] = [
            (w.removesuffix(":0"), np.asarray(group[w])) for w in _h5_strings(group, "weight_names")
        ]
    return layers


def _is_keras_archive(path) -> bool:
    """A Keras 3 '.keras' file: a zip holding model.weights.h5 (a torch .pth is a zip too)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return "model.weights.h5" in archive.namelist()


def read_torch_state_dict(path) -> dict[str, np.ndarray]:
    """A torchvision state dict from ``.safetensors`` or a ``.pth`` (``weights_only=True``)."""
    path = Path(path)
    if h5py.is_hdf5(path):
        raise ValueError(
            f"{path}: an HDF5 file, i.e. Keras weights; read it with --from keras (a .h5 name)"
        )
    if path.suffix == ".safetensors":
        load_file = _optional_import("safetensors.numpy", path, "safetensors").load_file

        try:
            state = load_file(str(path))
        except Exception as err:  # safetensors' own error types; a truncated header, ...
            raise ValueError(f"{path}: unreadable safetensors file ({err})") from None
    else:
        state = _torch_tensors(path, _torch_load(path))
    return {k.removeprefix("module."): np.asarray(v) for k, v in state.items()}


# What else a user can do when a reader is missing.
_INSTEAD = {
    "torch": "or save the state dict as .safetensors where torch is installed",
    "safetensors": "",
}


def _optional_import(module: str, path: Path, package: str):
    """``module``, which only reading ``path`` needs (not a dependency of sapsam-jax)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:  # not installed, or installed but broken (the error says which)
        instead = f"; {_INSTEAD[package]}" if _INSTEAD[package] else ""
        raise ValueError(
            f"{path}: reading it needs the {package!r} package ({err}; pip install "
            f"{package}{instead})"
        ) from err


def _torch_load(path: Path):
    torch = _optional_import("torch", path, "torch")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # Not a plain state dict of tensors. torch's message suggests weights_only=False,
        # which would run arbitrary code from a downloaded file: never do that here, nor pass
        # that advice on; name what the file holds instead.
        held = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"it holds a {held.group(1)} object" if held else "it holds other Python objects"
        raise ValueError(
            f"{path}: not a torchvision state dict of tensors ({what}; torch.load with "
            "weights_only=True refuses to run code from a file)"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:  # truncated or not a torch file at all
        raise ValueError(f"{path}: unreadable torch file, truncated or corrupt ({err})") from None


def _torch_tensors(path: Path, state) -> dict[str, np.ndarray]:
    """The tensors of a loaded state dict, unwrapped from a training checkpoint's
    ``{"state_dict": ...}`` or ``{"model": ...}``; anything else is named."""
    import torch

    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    other = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if other:
        raise ValueError(f"{path}: entries that are not tensors: {', '.join(map(str, other[:5]))}")
    return {
        k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
        for k, v in state.items()
    }


# ----------------------------------------------------------------------------- Keras layout


def _keras_layer(layers, name: str, path) -> list[tuple[str, np.ndarray]]:
    if name not in layers:
        raise ValueError(f"layer {name!r} not found in {path}")
    return layers[name]


def _keras_conv(name: str, weights) -> tuple[np.ndarray, np.ndarray | None]:
    """Kernel (HWIO, as Keras stores it) and optional bias, told apart by rank, not by name
    (the published VGG file calls them 'block1_conv1_W_1' / 'block1_conv1_b_1')."""
    kernels = [w for _, w in weights if w.ndim == 4]
    biases = [w for _, w in weights if w.ndim == 1]
    if len(kernels) != 1 or len(biases) > 1 or len(weights) != len(kernels) + len(biases):
        shapes = [w.shape for _, w in weights]
        raise ValueError(
            f"layer {name!r}: expected a 4-D kernel and at most one bias, got shapes {shapes}"
        )
    return kernels[0], biases[0] if biases else None


def _keras_bn(name: str, weights) -> dict[str, np.ndarray]:
    """gamma (optional), beta, moving_mean, moving_variance, by name or else by legacy order."""
    short = [n.rsplit("/", 1)[-1] for n, _ in weights]
    if set(short) <= set(BN_WEIGHTS) and len(set(short)) == len(short):
        named = dict(zip(short, (w for _, w in weights), strict=True))
    elif len(weights) in (3, 4):
        named = dict(zip(BN_WEIGHTS[4 - len(weights) :], (w for _, w in weights), strict=True))
    else:
        raise ValueError(f"layer {name!r}: unexpected BatchNormalization weights {short}")
    if not set(BN_WEIGHTS[1:]) <= named.keys():
        raise ValueError(f"layer {name!r}: incomplete BatchNormalization weights {short}")
    return named


def _numbered(layers, prefix: str) -> list[str]:
    """Unnamed Keras layers ('conv2d', 'conv2d_1', ...) in creation order (plain name = 0)."""
    pattern = re.compile(rf"^{prefix}(?:_(\d+))?$")
    found = [(int(m.group(1) or 0), name) for name in layers if (m := pattern.match(name))]
    return [name for _, name in sorted(found)]


def _bn_entries(prefix, name, scale, bias, mean, var) -> NewState:
    new = {
        prefix + ("bn", "bias"): (name, bias),
        prefix + ("bn", "mean"): (name, mean),
        prefix + ("bn", "var"): (name, var),
    }
    if scale is not None:
        new[prefix + ("bn", "scale")] = (name, scale)
    return new


def _keras_vgg(model: VGG, layers, path) -> NewState:
    # A VGG19 file holds every layer a VGG16 needs, with the same shapes: without this check
    # it would load into a VGG16 and drop block3_conv4..block5_conv4 silently.
    expected = {f"{block}_{conv}" for block, conv in model.conv_paths()}
    extra = sorted(n for n in layers if re.fullmatch(r"block\d+_conv\d+", n) and n not in expected)
    if extra:
        raise ValueError(
            f"{path} has convolution layers {', '.join(extra)} that {model.arch} lacks "
            "(weights of another VGG depth?)"
        )
    new = {}
    for block, conv in model.conv_paths():
        name = f"{block}_{conv}"
        kernel, bias = _keras_conv(name, _keras_layer(layers, name, path))
        if bias is None:
            raise ValueError(f"layer {name!r}: VGG convolutions need a bias")
        new[(block, conv, "kernel")] = (name, kernel)
        new[(block, conv, "bias")] = (name, bias)
    return new


def _keras_inception(model: InceptionV3, layers, path) -> tuple[NewState, dict]:
    paths = model.conv_paths()
    convs, bns = _numbered(layers, "conv2d"), _numbered(layers, "batch_normalization")
    if len(convs) != len(paths) or len(bns) != len(paths):
        raise ValueError(
            f"{path}: InceptionV3 needs {len(paths)} conv2d_N and "
            f"batch_normalization_N layers, found {len(convs)} and {len(bns)}"
        )
    new, gammas = {}, []
    for (block, conv), conv_name, bn_name in zip(paths, convs, bns, strict=True):
        kernel, bias = _keras_conv(conv_name, layers[conv_name])
        if bias is not None:
            raise ValueError(f"layer {conv_name!r}: InceptionV3 convolutions have no bias")
        new[(block, conv, "conv", "kernel")] = (conv_name, kernel)
        bn = _keras_bn(bn_name, layers[bn_name])
        gammas.append("gamma" in bn)
        new.update(
            _bn_entries(
                (block, conv),
                bn_name,
                bn.get("gamma"),
                bn["beta"],
                bn["moving_mean"],
                bn["moving_variance"],
            )
        )
    if len(set(gammas)) > 1:
        raise ValueError(f"{path}: some BatchNormalization layers have gamma, some do not")
    return new, {"bn_scale": gammas[0], "pool_include_pad": False}


def load_keras_weights(model, path) -> str:
    """Load a Keras application weights file (legacy HDF5, with or without top) in place.

    Returns the preprocessing convention: ``"caffe"`` (VGG) or ``"tf"`` (InceptionV3).
    """
    layers = read_keras_h5(path)
    if isinstance(model, VGG):
        new, conventions, preprocessing = _named(path, _keras_vgg, model, layers), {}, "caffe"
    elif isinstance(model, InceptionV3):
        new, conventions = _named(path, _keras_inception, model, layers)
        preprocessing = "tf"
    else:
        raise TypeError(f"no Keras weight mapping for {type(model).__name__}")
    assign_backbone(model, new, conventions, path)
    return _loaded(model, preprocessing)


def _named(path, convert, model, layers):
    """``convert(model, layers, path)``, its errors about one layer naming the file too."""
    try:
        return convert(model, layers, path)
    except ValueError as err:
        if str(path) in str(err):
            raise
        raise ValueError(f"{path}: {err}") from err


# ----------------------------------------------------------------------------- torchvision layout


def _torch(state, key: str, path) -> np.ndarray:
    if key not in state:
        raise ValueError(f"layer {key!r} not found in {path}")
    return state[key]


def _oihw_to_hwio(kernel: np.ndarray) -> np.ndarray:
    return np.transpose(kernel, (2, 3, 1, 0))


def _torch_vgg(model: VGG, state, path) -> NewState:
    """torchvision ``features`` indices: conv, ReLU per conv, one MaxPool per block."""
    new, index = {}, 0
    for block in model.block_names:
        for conv in getattr(model, block).conv_names:
            name = f"features.{index}"
            new[(block, conv, "kernel")] = (
                name,
                _oihw_to_hwio(_torch(state, name + ".weight", path)),
            )
            new[(block, conv, "bias")] = (name, _torch(state, name + ".bias", path))
            index += 2
        index += 1
    return new


def _torch_inception(model: InceptionV3, state, path) -> NewState:
    new = {}
    for block, conv in model.conv_paths():
        name = TORCH_STEM[conv] if block == "stem" else f"{TORCH_MIXED[block]}.{conv}"
        kernel = _torch(state, f"{name}.conv.weight", path)
        new[(block, conv, "conv", "kernel")] = (name, _oihw_to_hwio(kernel))
        bn = [
            _torch(state, f"{name}.bn.{k}", path)
            for k in ("weight", "bias", "running_mean", "running_var")
        ]
        new.update(_bn_entries((block, conv), f"{name}.bn", *bn))
    return new


def load_torchvision_weights(model, path) -> str:
    """Load a torchvision VGG / Inception v3 state dict (``.pth`` or ``.safetensors``) in place.

    For InceptionV3 this switches the model to torchvision's conventions (BatchNorm with scale,
    ``pool_include_pad=True``). Returns the preprocessing convention: ``"torch"`` for VGG,
    ``"tf"`` for Inception (torchvision's pretrained Inception sets ``transform_input=True``,
    which maps torch-normalised input back to ``x * 2 - 1``).
    """
    state = read_torch_state_dict(path)
    if isinstance(model, VGG):
        assign_backbone(model, _torch_vgg(model, state, path), {}, path)
        return _loaded(model, "torch")
    if isinstance(model, InceptionV3):
        conventions = {"bn_scale": True, "pool_include_pad": True}
        assign_backbone(model, _torch_inception(model, state, path), conventions, path)
        return _loaded(model, "tf")
    raise TypeError(f"no torchvision weight mapping for {type(model).__name__}")


# ----------------------------------------------------------------------------- assignment


def model_arrays(model) -> dict[tuple[str, ...], object]:
    """Path -> Variable for every parameter and batch statistic."""
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    return dict(nnx.to_flat_state(state))


def _expected_shapes(model, conventions: dict) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Shapes the model will have once ``conventions`` (bn_scale...) are applied."""
    shapes = {p: tuple(v.shape) for p, v in model_arrays(model).items()}
    if isinstance(model, InceptionV3) and conventions.get("bn_scale") is not None:
        for block, conv in model.conv_paths():
            scale = (block, conv, "bn", "scale")
            if conventions["bn_scale"]:
                shapes[scale] = shapes[(block, conv, "bn", "bias")]
            else:
                shapes.pop(scale, None)
    return shapes


def _validate(model, new: NewState, conventions: dict, source) -> None:
    expected = _expected_shapes(model, conventions)
    for path, (name, array) in new.items():
        if path not in expected:
            raise ValueError(f"layer {name!r} from {source}: the model has no {'.'.join(path)}")
        if tuple(array.shape) != expected[path]:
            raise ValueError(
                f"layer {name!r} from {source}: shape {tuple(array.shape)} in the "
                f"file, model expects {expected[path]} for {'.'.join(path)}"
            )
    missing = [p for p in expected if p[0] != "head" and p not in new]
    if missing:
        raise ValueError(
            f"{source} has no weights for {len(missing)} backbone arrays, e.g. "
            f"{'.'.join(missing[0])}"
        )


def _loaded(model, preprocessing: str) -> str:
    """Record the weights' input convention on the model (``model.preprocessing``)."""
    model.preprocessing = preprocessing
    return preprocessing


def assign_backbone(model, new: NewState, conventions: dict, source) -> None:
    """Check ``new`` against the model, then switch conventions and assign all arrays at once."""
    _validate(model, new, conventions, source)
    if conventions and isinstance(model, InceptionV3):
        model.set_conventions(**conventions)
    variables = model_arrays(model)
    for path, (_, array) in new.items():
        # set_value (not [...] =) also fills abstract models built by `build_model(weights=...)`.
        variables[path].set_value(jnp.asarray(array, dtype=variables[path].dtype))
