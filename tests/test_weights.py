"""Weight loading: parity with keras.applications and a torchvision-layout torch reference,
the published file layouts, error handling, Orbax checkpoints and scripts/convert_weights.py.

Full-width models are only ever built abstractly and filled from files (`build_model(weights=)`),
so no test pays for random initialisation of 20 M parameters.
"""

import contextlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from flax import nnx

from sapsam_jax.models import (
    build_model,
    load_keras_weights,
    load_torchvision_weights,
    load_weights,
    read_weights_info,
    require_weights_file,
    save_weights,
)
from sapsam_jax.models._inception import MIXED_NAMES
from sapsam_jax.models._weights import TORCH_MIXED, TORCH_STEM, model_arrays

os.environ.setdefault("KERAS_BACKEND", "jax")
import keras  # noqa: E402
from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
PARITY_RTOL = 1e-4  # max |ours - reference| / max |reference|, float32
SIZES = {"vgg19": [(32, 32), (48, 64)], "inception_v3": [(75, 75), (107, 139)]}
KERAS_APPS = {"vgg19": "VGG19", "inception_v3": "InceptionV3"}
TINY = {"width": 0.125, "head_units": 32}
# Keras's JAX backend converts arrays with np.array(x, copy=False) (numpy 2 deprecation).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def _features(model, x):
    return np.asarray(nnx.jit(lambda m, x: m.features(x))(model, x))


def _arrays(model) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in model_arrays(model).items()}


def _inputs(arch, size_index, seed=0):
    height, width = SIZES[arch][size_index]
    return np.random.default_rng(seed).normal(size=(2, height, width, 3)).astype(np.float32)


# ----------------------------------------------------------------------------- Keras reference


@contextlib.contextmanager
def _cheap_keras_initializers():
    """Keras compiles an initialiser per weight shape (minutes on 2 cores); every weight is
    overwritten by `_randomize_keras` anyway, so create them as numpy zeros / ones."""
    from keras.src.initializers import constant_initializers, random_initializers

    def zeros(self, shape, dtype=None):
        return np.zeros(shape, np.float32)

    def ones(self, shape, dtype=None):
        return np.ones(shape, np.float32)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(random_initializers.VarianceScaling, "__call__", zeros)
        patch.setattr(constant_initializers.Zeros, "__call__", zeros)
        patch.setattr(constant_initializers.Ones, "__call__", ones)
        yield


def _random_weight(path: str, shape, rng) -> np.ndarray:
    """He-scaled kernels keep activations O(1) through 16-94 layers; BN variances positive."""
    if len(shape) == 4:
        return rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:3])), shape).astype(np.float32)
    if "variance" in path:
        return rng.uniform(0.5, 2.0, shape).astype(np.float32)
    if "gamma" in path:
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    return rng.normal(0.0, 0.1, shape).astype(np.float32)


def _keras_reference(arch, tmp_path_factory):
    keras.backend.clear_session()  # unnamed Inception layers start again at conv2d
    with _cheap_keras_initializers():
        reference = getattr(keras.applications, KERAS_APPS[arch])(
            weights=None, include_top=False, input_shape=(None, None, 3)
        )
    rng = np.random.default_rng(1)
    for layer in reference.layers:
        if layer.weights:
            layer.set_weights([_random_weight(w.path, w.shape, rng) for w in layer.weights])
    path = tmp_path_factory.mktemp("keras") / f"{arch}_random.h5"
    with h5py.File(path, "w") as f:
        save_weights_to_hdf5_group(f, reference)
    ours = build_model(arch, rngs=nnx.Rngs(0), weights=path)
    ours.eval()
    return reference, path, ours


@pytest.fixture(scope="module")
def keras_vgg19(tmp_path_factory):
    return _keras_reference("vgg19", tmp_path_factory)


@pytest.fixture(scope="module")
def keras_inception_v3(tmp_path_factory):
    return _keras_reference("inception_v3", tmp_path_factory)


@pytest.mark.parametrize("size_index", [0, 1])
@pytest.mark.parametrize("arch", ["vgg19", "inception_v3"])
def test_keras_parity(arch, size_index, request):
    reference, _, ours = request.getfixturevalue(f"keras_{arch}")
    x = _inputs(arch, size_index)
    expected = reference.predict(x, verbose=0)
    got = _features(ours, x)
    assert got.shape == expected.shape
    error = _relative_error(got, expected)
    print(f"keras parity {arch} {x.shape[1:3]}: relative error {error:.2e}")
    assert error < PARITY_RTOL


@pytest.mark.parametrize("arch", ["vgg19", "inception_v3"])
def test_parameter_count_matches_keras(arch, request):
    reference, _, ours = request.getfixturevalue(f"keras_{arch}")
    abstract = nnx.eval_shape(lambda: build_model(arch, rngs=nnx.Rngs(0)))
    state = nnx.state(abstract, nnx.Any(nnx.Param, nnx.BatchStat))
    count = sum(int(np.prod(v.shape)) for p, v in nnx.to_flat_state(state) if p[0] != "head")
    assert count == reference.count_params()  # 20,024,384 and 21,802,784
    assert ours.preprocessing == {"vgg19": "caffe", "inception_v3": "tf"}[arch]


# ----------------------------------------------------------------------------- published layouts


def _write_legacy_h5(path, layers):
    """Keras 2 legacy layout: root attr layer_names, per-layer attr weight_names, datasets."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [name.encode() for name, _ in layers]
        for name, weights in layers:
            group = f.create_group(name)
            group.attrs["weight_names"] = [w.encode() for w, _ in weights]
            for weight_name, array in weights:
                group.create_dataset(weight_name, data=array)


def _random_like(model, rng) -> dict:
    return {p: _random_weight("/".join(p), v.shape, rng) for p, v in model_arrays(model).items()}


def _published_vgg_layers(arrays):
    """As in vgg19_weights_tf_dim_ordering_tf_kernels.h5: 'block1_conv1_W_1:0', top layers."""
    layers = [("input_1", [])]
    for b in range(1, 6):
        for c in range(1, 5 if b > 2 else 3):
            kernel, bias = (
                arrays[(f"block{b}", f"conv{c}", "kernel")],
                arrays[(f"block{b}", f"conv{c}", "bias")],
            )
            name = f"block{b}_conv{c}"
            layers.append((name, [(f"{name}_W_1:0", kernel), (f"{name}_b_1:0", bias)]))
        layers.append((f"block{b}_pool", []))
    layers.append(("predictions", [("predictions_W_1:0", np.zeros((64, 1000), np.float32))]))
    return layers


def test_published_vgg_layout_with_top(tmp_path):
    template = nnx.eval_shape(lambda: build_model("vgg19", rngs=nnx.Rngs(0), **TINY))
    arrays = _random_like(template, np.random.default_rng(0))
    path = tmp_path / "vgg19_weights_tf_dim_ordering_tf_kernels.h5"
    _write_legacy_h5(path, _published_vgg_layers(arrays))
    model = build_model("vgg19", rngs=nnx.Rngs(0), weights=path, **TINY)
    loaded = _arrays(model)
    for p, array in arrays.items():
        if p[0] != "head":
            np.testing.assert_array_equal(loaded[p], array, err_msg=str(p))


def test_vgg19_file_is_refused_by_vgg16(tmp_path):
    # A VGG19 file holds every layer of a VGG16 with the same shapes: it must not load silently
    # with block3_conv4..block5_conv4 dropped.
    template = nnx.eval_shape(lambda: build_model("vgg19", rngs=nnx.Rngs(0), **TINY))
    arrays = _random_like(template, np.random.default_rng(0))
    path = tmp_path / "vgg19.h5"
    _write_legacy_h5(path, _published_vgg_layers(arrays))
    with pytest.raises(ValueError, match="block3_conv4, block4_conv4, block5_conv4.*vgg16"):
        build_model("vgg16", rngs=nnx.Rngs(0), weights=path, **TINY)


def test_weights_of_the_other_source_or_missing_get_clear_errors(tmp_path):
    from safetensors.numpy import save_file

    model = nnx.eval_shape(lambda: build_model("vgg19", rngs=nnx.Rngs(0), **TINY))
    save_file({"features.0.weight": np.zeros((8, 3, 3, 3), np.float32)}, tmp_path / "t.safetensors")
    with pytest.raises(ValueError, match="not an HDF5 file.*--from torchvision"):
        load_keras_weights(model, tmp_path / "t.safetensors")
    _write_legacy_h5(tmp_path / "k.h5", [("block1_conv1", [])])
    with pytest.raises(ValueError, match="HDF5 file.*--from keras"):
        load_torchvision_weights(model, tmp_path / "k.h5")
    for missing in ("weights/vgg19_keras", "missing.h5", "missing.pth"):
        with pytest.raises(FileNotFoundError, match="vgg19_weights_tf_dim_ordering"):
            build_model("vgg19", rngs=nnx.Rngs(0), weights=tmp_path / missing, **TINY)
    (tmp_path / "junk.pth").write_bytes(b"not a pickle at all")
    pytest.importorskip("torch")  # .pth files need torch (an optional dependency)
    with pytest.raises(ValueError, match="not a torchvision state dict"):
        load_torchvision_weights(model, tmp_path / "junk.pth")


class PickledObject:
    pass


def test_a_pth_holding_objects_is_named_without_advice_to_run_its_code(tmp_path):
    torch = pytest.importorskip("torch")
    from sapsam_jax.models._weights import read_torch_state_dict

    torch.save({"features.0.weight": PickledObject()}, tmp_path / "obj.pth")
    with pytest.raises(ValueError, match="holds a .*PickledObject object") as refused:
        read_torch_state_dict(tmp_path / "obj.pth")
    # torch's own message advises weights_only=False, i.e. running code from the file.
    assert "weights_only set to False" not in str(refused.value)
    assert "Re-running" not in str(refused.value)


@pytest.mark.parametrize(
    "name, hidden", [("w.pth", ("torch",)), ("w.safetensors", ("safetensors", "safetensors.numpy"))]
)
def test_an_optional_reader_that_is_not_installed_is_named(tmp_path, monkeypatch, name, hidden):
    # Neither torch nor safetensors is a dependency: a traceback was all a user got.
    from sapsam_jax.models._weights import read_torch_state_dict

    for module in hidden:
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    (tmp_path / name).write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match=rf"{name}: reading it needs the '{hidden[0]}' package"):
        read_torch_state_dict(tmp_path / name)
    with pytest.raises(ValueError, match="halted"):  # the import's own error, e.g. a broken one
        read_torch_state_dict(tmp_path / name)


def _published_inception_layers(model, arrays, rng):
    """Keras 2 names (conv2d_1 .. conv2d_94, 'beta:0', no gamma), layer order shuffled."""
    layers = []
    for n, (block, conv) in enumerate(model.conv_paths(), start=1):
        layers.append(
            (f"conv2d_{n}", [(f"conv2d_{n}/kernel:0", arrays[(block, conv, "conv", "kernel")])])
        )
        bn = [
            (f"batch_normalization_{n}/{k}:0", arrays[(block, conv, "bn", ours)])
            for k, ours in (("beta", "bias"), ("moving_mean", "mean"), ("moving_variance", "var"))
        ]
        layers.append((f"batch_normalization_{n}", bn))
    order = rng.permutation(len(layers))
    return [layers[i] for i in order] + [("predictions", [])]


@pytest.fixture(scope="module")
def inception_template():
    """Shapes of the tiny InceptionV3 (abstract; read only)."""
    return nnx.eval_shape(lambda: build_model("inception_v3", rngs=nnx.Rngs(0), **TINY))


def test_damaged_or_wrapped_weight_files_are_named(tmp_path):
    from safetensors.numpy import save_file

    model = nnx.eval_shape(lambda: build_model("vgg19", rngs=nnx.Rngs(0), **TINY))
    save_file({"features.0.weight": np.zeros((8, 3, 3, 3), np.float32)}, tmp_path / "t.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((tmp_path / "t.safetensors").read_bytes()[:40])
    with pytest.raises(ValueError, match=r"cut.safetensors: unreadable safetensors file"):
        load_torchvision_weights(model, cut)
    _write_legacy_h5(tmp_path / "k.h5", [("block1_conv1", [])])
    (tmp_path / "cut.h5").write_bytes((tmp_path / "k.h5").read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"cut.h5: unreadable HDF5 file"):
        load_keras_weights(model, tmp_path / "cut.h5")
    kernel_only = [("block1_conv1/kernel:0", np.zeros((3, 3, 3, 8), np.float32))]
    _write_legacy_h5(tmp_path / "nobias.h5", [("block1_conv1", kernel_only)])
    with pytest.raises(ValueError, match=r"nobias.h5: layer 'block1_conv1': VGG convolutions need"):
        load_keras_weights(model, tmp_path / "nobias.h5")
    import zipfile

    with zipfile.ZipFile(tmp_path / "vgg19.keras", "w") as archive:  # Keras 3's layout
        for name in ("metadata.json", "config.json", "model.weights.h5"):
            archive.writestr(name, "{}")
    with pytest.raises(ValueError, match=r"vgg19.keras: a Keras 3 '.keras' archive.*model.h5"):
        build_model("vgg19", rngs=nnx.Rngs(0), weights=tmp_path / "vgg19.keras", **TINY)
    with h5py.File(tmp_path / "vgg19.weights.h5", "w") as f:  # Keras 3's save_weights layout
        f.create_group("layers")
    with pytest.raises(ValueError, match=r"Keras 3 '.weights.h5' file .*model.save\('model.h5'\)"):
        load_keras_weights(model, tmp_path / "vgg19.weights.h5")
    torch = pytest.importorskip("torch")  # .pth files need torch (an optional dependency)
    state = {"features.0.weight": torch.zeros(8, 3, 3, 3)}
    torch.save({"model": state, "epoch": 3}, tmp_path / "ckpt.pth")  # a training checkpoint
    from sapsam_jax.models._weights import read_torch_state_dict

    assert list(read_torch_state_dict(tmp_path / "ckpt.pth")) == ["features.0.weight"]
    torch.save([state], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list.pth: holds a list, not a state dict"):
        read_torch_state_dict(tmp_path / "list.pth")
    torch.save(state | {"epoch": 3}, tmp_path / "mixed.pth")
    with pytest.raises(ValueError, match=r"mixed.pth: entries that are not tensors: epoch"):
        read_torch_state_dict(tmp_path / "mixed.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "ckpt.pth").read_bytes()[:200])
    with pytest.raises(ValueError, match=r"cut.pth: unreadable torch file"):
        read_torch_state_dict(tmp_path / "cut.pth")


def test_a_damaged_h5_is_an_error_naming_the_file(tmp_path):
    # A file whose HDF5 metadata is damaged opens, then h5py raised a bare KeyError, OSError or
    # RuntimeError while reading it, naming neither the file nor the problem (a traceback from
    # scripts/convert_weights.py for the KeyError and RuntimeError).
    model = nnx.eval_shape(lambda: build_model("vgg19", rngs=nnx.Rngs(0), **TINY))
    bias = ("block1_conv1/bias:0", np.zeros(8, np.float32))
    _write_legacy_h5(tmp_path / "group.h5", [("block1_conv1", [bias])])
    with h5py.File(tmp_path / "group.h5", "a") as f:  # listed in layer_names, group gone
        del f["block1_conv1"]
    with pytest.raises(ValueError, match=r"group.h5: unreadable HDF5 file, .*damaged"):
        load_keras_weights(model, tmp_path / "group.h5")
    _write_legacy_h5(tmp_path / "dataset.h5", [("block1_conv1", [bias])])
    with h5py.File(tmp_path / "dataset.h5", "a") as f:  # listed in weight_names, dataset gone
        del f["block1_conv1/block1_conv1/bias:0"]
    with pytest.raises(ValueError, match=r"dataset.h5: unreadable HDF5 file, .*damaged"):
        load_keras_weights(model, tmp_path / "dataset.h5")


def test_published_inception_layout_maps_unnamed_layers_by_number(tmp_path, inception_template):
    template = inception_template
    rng = np.random.default_rng(0)
    arrays = _random_like(template, rng)
    path = tmp_path / "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
    _write_legacy_h5(path, _published_inception_layers(template, arrays, rng))
    model = build_model("inception_v3", rngs=nnx.Rngs(0), weights=path, **TINY)
    loaded = _arrays(model)
    for p, array in arrays.items():
        if p[0] != "head":
            np.testing.assert_array_equal(loaded[p], array, err_msg=str(p))
    assert not model.bn_scale and not model.pool_include_pad


def test_mismatched_file_names_layer_and_leaves_model_unchanged(tmp_path):
    model = build_model("vgg19", rngs=nnx.Rngs(0), **TINY)
    before = _arrays(model)
    arrays = _random_like(model, np.random.default_rng(1))
    arrays[("block3", "conv2", "kernel")] = np.zeros((3, 3, 32, 7), np.float32)
    path = tmp_path / "bad.h5"
    _write_legacy_h5(path, _published_vgg_layers(arrays))
    with pytest.raises(ValueError, match=r"block3_conv2.*\(3, 3, 32, 7\).*\(3, 3, 32, 32\)"):
        load_keras_weights(model, path)
    layers = [
        layer
        for layer in _published_vgg_layers(_random_like(model, np.random.default_rng(2)))
        if layer[0] != "block5_conv4"
    ]
    _write_legacy_h5(path, layers)
    with pytest.raises(ValueError, match="block5_conv4"):
        load_keras_weights(model, path)
    after = _arrays(model)
    for p, array in before.items():  # nothing half-loaded (block1, block2 came first)
        np.testing.assert_array_equal(after[p], array, err_msg=str(p))
    assert model.preprocessing == "none"


def test_inception_needs_all_unnamed_layers(tmp_path, inception_template):
    model = inception_template
    path = tmp_path / "vgg.h5"
    _write_legacy_h5(path, [("conv2d_1", [("conv2d_1/kernel:0", np.zeros((3, 3, 3, 4)))])])
    with pytest.raises(ValueError, match="needs 94 conv2d_N"):
        load_keras_weights(model, path)


# ----------------------------------------------------------------------------- torchvision layout


def _torch_inception_state(model, arrays, gamma=True) -> dict:
    """torchvision Inception3 keys (OIHW kernels) from our arrays."""
    state = {"fc.weight": np.zeros((1000, 8), np.float32)}  # ignored, like AuxLogits
    for block, conv in model.conv_paths():
        name = TORCH_STEM[conv] if block == "stem" else f"{TORCH_MIXED[block]}.{conv}"
        kernel = arrays[(block, conv, "conv", "kernel")]
        state[f"{name}.conv.weight"] = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
        bias = arrays[(block, conv, "bn", "bias")]
        state[f"{name}.bn.weight"] = (1.0 + 0.1 * bias).astype(np.float32) if gamma else bias
        state[f"{name}.bn.bias"] = bias
        state[f"{name}.bn.running_mean"] = arrays[(block, conv, "bn", "mean")]
        state[f"{name}.bn.running_var"] = arrays[(block, conv, "bn", "var")]
        state[f"{name}.bn.num_batches_tracked"] = np.zeros((), np.int64)
    return state


def test_torchvision_inception_layout_and_checkpoint_keep_conventions(tmp_path, inception_template):
    from safetensors.numpy import save_file

    template = inception_template
    arrays = _random_like(template, np.random.default_rng(0))
    state = _torch_inception_state(template, arrays)
    save_file(state, tmp_path / "inception.safetensors")
    model = build_model(
        "inception_v3", rngs=nnx.Rngs(0), weights=tmp_path / "inception.safetensors", **TINY
    )
    assert model.preprocessing == "tf" and model.bn_scale and model.pool_include_pad
    assert all(getattr(model, b).pool_include_pad for b in MIXED_NAMES)
    np.testing.assert_array_equal(
        model.mixed4.branch7x7_2.bn.scale.get_value(), state["Mixed_6b.branch7x7_2.bn.weight"]
    )
    np.testing.assert_array_equal(
        model.mixed4.branch7x7_2.conv.kernel.get_value(),
        arrays[("mixed4", "branch7x7_2", "conv", "kernel")],
    )
    # The checkpoint records the conventions; loading switches a default (Keras) model over.
    save_weights(model, tmp_path / "ckpt", model.preprocessing)
    restored = build_model("inception_v3", rngs=nnx.Rngs(3), weights=tmp_path / "ckpt", **TINY)
    assert restored.bn_scale and restored.pool_include_pad and restored.mixed10.pool_include_pad
    saved, loaded = _arrays(model), _arrays(restored)
    assert saved.keys() == loaded.keys()
    for p, array in saved.items():
        np.testing.assert_array_equal(loaded[p], array, err_msg=str(p))


def _torch_vgg19(nn):
    """torchvision ``vgg19().features``: conv, ReLU per conv, MaxPool per block."""
    layers, cin = [], 3
    for n_convs, channels in zip((2, 2, 4, 4, 4), (64, 128, 256, 512, 512), strict=True):
        for _ in range(n_convs):
            layers += [nn.Conv2d(cin, channels, 3, padding=1), nn.ReLU(inplace=True)]
            cin = channels
        layers.append(nn.MaxPool2d(2, 2))
    net = nn.Module()
    net.features = nn.Sequential(*layers)
    net.forward = net.features.forward
    return net


def _torch_inception_v3(nn):
    """torchvision ``inception_v3(aux_logits=False, init_weights=False)`` up to Mixed_7c,
    same module names and paddings (from torchvision/models/inception.py)."""
    import torch
    import torch.nn.functional as F

    class BasicConv2d(nn.Module):
        def __init__(self, cin, cout, **kwargs):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
            self.bn = nn.BatchNorm2d(cout, eps=0.001)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    def avg(x):
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)  # count_include_pad=True

    class Block(nn.Module):
        def __init__(self, convs, forward):
            super().__init__()
            for name, args, kwargs in convs:
                setattr(self, name, BasicConv2d(*args, **kwargs))
            self._forward = forward

        def forward(self, x):
            return torch.cat(self._forward(self, x), 1)

    def a(cin, pool):
        return Block(
            [
                ("branch1x1", (cin, 64), dict(kernel_size=1)),
                ("branch5x5_1", (cin, 48), dict(kernel_size=1)),
                ("branch5x5_2", (48, 64), dict(kernel_size=5, padding=2)),
                ("branch3x3dbl_1", (cin, 64), dict(kernel_size=1)),
                ("branch3x3dbl_2", (64, 96), dict(kernel_size=3, padding=1)),
                ("branch3x3dbl_3", (96, 96), dict(kernel_size=3, padding=1)),
                ("branch_pool", (cin, pool), dict(kernel_size=1)),
            ],
            lambda m, x: [
                m.branch1x1(x),
                m.branch5x5_2(m.branch5x5_1(x)),
                m.branch3x3dbl_3(m.branch3x3dbl_2(m.branch3x3dbl_1(x))),
                m.branch_pool(avg(x)),
            ],
        )

    def b(cin):
        return Block(
            [
                ("branch3x3", (cin, 384), dict(kernel_size=3, stride=2)),
                ("branch3x3dbl_1", (cin, 64), dict(kernel_size=1)),
                ("branch3x3dbl_2", (64, 96), dict(kernel_size=3, padding=1)),
                ("branch3x3dbl_3", (96, 96), dict(kernel_size=3, stride=2)),
            ],
            lambda m, x: [
                m.branch3x3(x),
                m.branch3x3dbl_3(m.branch3x3dbl_2(m.branch3x3dbl_1(x))),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
        )

    def c(cin, c7):
        row, col = (
            dict(kernel_size=(1, 7), padding=(0, 3)),
            dict(kernel_size=(7, 1), padding=(3, 0)),
        )
        return Block(
            [
                ("branch1x1", (cin, 192), dict(kernel_size=1)),
                ("branch7x7_1", (cin, c7), dict(kernel_size=1)),
                ("branch7x7_2", (c7, c7), row),
                ("branch7x7_3", (c7, 192), col),
                ("branch7x7dbl_1", (cin, c7), dict(kernel_size=1)),
                ("branch7x7dbl_2", (c7, c7), col),
                ("branch7x7dbl_3", (c7, c7), row),
                ("branch7x7dbl_4", (c7, c7), col),
                ("branch7x7dbl_5", (c7, 192), row),
                ("branch_pool", (cin, 192), dict(kernel_size=1)),
            ],
            lambda m, x: [
                m.branch1x1(x),
                m.branch7x7_3(m.branch7x7_2(m.branch7x7_1(x))),
                m.branch7x7dbl_5(
                    m.branch7x7dbl_4(m.branch7x7dbl_3(m.branch7x7dbl_2(m.branch7x7dbl_1(x))))
                ),
                m.branch_pool(avg(x)),
            ],
        )

    def d(cin):
        return Block(
            [
                ("branch3x3_1", (cin, 192), dict(kernel_size=1)),
                ("branch3x3_2", (192, 320), dict(kernel_size=3, stride=2)),
                ("branch7x7x3_1", (cin, 192), dict(kernel_size=1)),
                ("branch7x7x3_2", (192, 192), dict(kernel_size=(1, 7), padding=(0, 3))),
                ("branch7x7x3_3", (192, 192), dict(kernel_size=(7, 1), padding=(3, 0))),
                ("branch7x7x3_4", (192, 192), dict(kernel_size=3, stride=2)),
            ],
            lambda m, x: [
                m.branch3x3_2(m.branch3x3_1(x)),
                m.branch7x7x3_4(m.branch7x7x3_3(m.branch7x7x3_2(m.branch7x7x3_1(x)))),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
        )

    def e(cin):
        def forward(m, x):
            b3 = m.branch3x3_1(x)
            bd = m.branch3x3dbl_2(m.branch3x3dbl_1(x))
            return [
                m.branch1x1(x),
                torch.cat([m.branch3x3_2a(b3), m.branch3x3_2b(b3)], 1),
                torch.cat([m.branch3x3dbl_3a(bd), m.branch3x3dbl_3b(bd)], 1),
                m.branch_pool(avg(x)),
            ]

        row, col = (
            dict(kernel_size=(1, 3), padding=(0, 1)),
            dict(kernel_size=(3, 1), padding=(1, 0)),
        )
        return Block(
            [
                ("branch1x1", (cin, 320), dict(kernel_size=1)),
                ("branch3x3_1", (cin, 384), dict(kernel_size=1)),
                ("branch3x3_2a", (384, 384), row),
                ("branch3x3_2b", (384, 384), col),
                ("branch3x3dbl_1", (cin, 448), dict(kernel_size=1)),
                ("branch3x3dbl_2", (448, 384), dict(kernel_size=3, padding=1)),
                ("branch3x3dbl_3a", (384, 384), row),
                ("branch3x3dbl_3b", (384, 384), col),
                ("branch_pool", (cin, 192), dict(kernel_size=1)),
            ],
            forward,
        )

    net = nn.Sequential()
    for name, module in [
        ("Conv2d_1a_3x3", BasicConv2d(3, 32, kernel_size=3, stride=2)),
        ("Conv2d_2a_3x3", BasicConv2d(32, 32, kernel_size=3)),
        ("Conv2d_2b_3x3", BasicConv2d(32, 64, kernel_size=3, padding=1)),
        ("maxpool1", nn.MaxPool2d(kernel_size=3, stride=2)),
        ("Conv2d_3b_1x1", BasicConv2d(64, 80, kernel_size=1)),
        ("Conv2d_4a_3x3", BasicConv2d(80, 192, kernel_size=3)),
        ("maxpool2", nn.MaxPool2d(kernel_size=3, stride=2)),
        ("Mixed_5b", a(192, 32)),
        ("Mixed_5c", a(256, 64)),
        ("Mixed_5d", a(288, 64)),
        ("Mixed_6a", b(288)),
        ("Mixed_6b", c(768, 128)),
        ("Mixed_6c", c(768, 160)),
        ("Mixed_6d", c(768, 160)),
        ("Mixed_6e", c(768, 192)),
        ("Mixed_7a", d(768)),
        ("Mixed_7b", e(1280)),
        ("Mixed_7c", e(2048)),
    ]:
        net.add_module(name, module)
    return net


def _randomize_torch(net, torch):
    torch.manual_seed(0)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.1)
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture(scope="module", params=["vgg19", "inception_v3"])
def torch_pair(request, tmp_path_factory):
    """(arch, torch reference, our model loaded from its state dict): .pth for VGG19,
    .safetensors for Inception v3 (both readers covered)."""
    torch = pytest.importorskip("torch")
    arch = request.param
    builder = {"vgg19": _torch_vgg19, "inception_v3": _torch_inception_v3}[arch]
    net = _randomize_torch(builder(torch.nn), torch)
    state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    path = tmp_path_factory.mktemp("torch") / arch
    if arch == "vgg19":
        state["classifier.0.weight"] = torch.zeros(4, 4)  # the ImageNet classifier is ignored
        path = path.with_suffix(".pth")
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        path = path.with_suffix(".safetensors")
        save_file(state, path)
    ours = build_model(arch, rngs=nnx.Rngs(0), weights=path)
    ours.eval()
    return arch, net, ours


@pytest.mark.parametrize("size_index", [0, 1])
def test_torchvision_parity(torch_pair, size_index):
    """Full VGG19 features and the full Inception v3 trunk (stem, Mixed_5b..Mixed_7c)."""
    import torch

    arch, net, ours = torch_pair
    x = _inputs(arch, size_index)
    with torch.no_grad():
        expected = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    got = _features(ours, x)
    assert got.shape == expected.shape
    error = _relative_error(got, expected)
    print(f"torchvision parity {arch} {x.shape[1:3]}: relative error {error:.2e}")
    assert error < PARITY_RTOL
    assert ours.preprocessing == {"vgg19": "torch", "inception_v3": "tf"}[arch]


def _torch_vgg_state(model, arrays) -> dict:
    state, index = {}, 0
    for block, conv in model.conv_paths():  # torchvision indices: conv, ReLU, ..., MaxPool
        kernel = arrays[(block, conv, "kernel")].transpose(3, 2, 0, 1)
        state[f"features.{index}.weight"] = np.ascontiguousarray(kernel)
        state[f"features.{index}.bias"] = arrays[(block, conv, "bias")]
        index += 3 if conv == getattr(model, block).conv_names[-1] else 2
    return state


def test_torchvision_mismatch_names_key(tmp_path):
    from safetensors.numpy import save_file

    model = nnx.eval_shape(lambda: build_model("vgg19", rngs=nnx.Rngs(0), **TINY))
    arrays = _random_like(model, np.random.default_rng(0))
    state = _torch_vgg_state(model, arrays)
    save_file(state, tmp_path / "vgg19.safetensors")
    state["features.0.weight"] = np.zeros((64, 3, 3, 3), np.float32)  # full-width file
    save_file(state, tmp_path / "vgg.safetensors")
    with pytest.raises(ValueError, match=r"features\.0.*\(3, 3, 3, 64\).*\(3, 3, 3, 8\)"):
        load_torchvision_weights(model, tmp_path / "vgg.safetensors")
    del state["features.34.weight"]
    save_file(state, tmp_path / "vgg.safetensors")
    with pytest.raises(ValueError, match=r"features\.34\.weight"):
        load_torchvision_weights(model, tmp_path / "vgg.safetensors")
    # torchvision numbers ReLUs and pools too: a VGG19 file lacks VGG16's features.17 (a ReLU
    # there), so it cannot load into a VGG16 (a Keras file needs its own check, above).
    vgg16 = nnx.eval_shape(lambda: build_model("vgg16", rngs=nnx.Rngs(0), **TINY))
    with pytest.raises(ValueError, match=r"features\.17\.weight' not found"):
        load_torchvision_weights(vgg16, tmp_path / "vgg19.safetensors")


# ----------------------------------------------------------------------------- checkpoints, CLI


def test_save_load_roundtrip(tmp_path):
    model = build_model("vgg19", rngs=nnx.Rngs(0), **TINY)
    target = tmp_path / "weights"
    save_weights(model, target, "caffe", source="x.h5")
    assert sorted(os.listdir(tmp_path)) == ["weights"]  # no temporary directory left behind
    info = read_weights_info(target)
    assert info["arch"] == "vgg19" and info["preprocessing"] == "caffe" and info["has_head"]
    assert info["config"]["width"] == 0.125 and info["source"] == "x.h5"
    other = build_model("vgg19", rngs=nnx.Rngs(1), **TINY)
    own_head = np.asarray(other.head.fc1.kernel[...])
    assert load_weights(other, target, head=False) == "caffe"
    np.testing.assert_array_equal(other.head.fc1.kernel[...], own_head)
    np.testing.assert_array_equal(other.block5.conv4.kernel[...], model.block5.conv4.kernel[...])
    load_weights(other, target)
    np.testing.assert_array_equal(other.head.fc1.kernel[...], model.head.fc1.kernel[...])
    with pytest.raises(FileExistsError):
        save_weights(model, target, "caffe")
    save_weights(model, target, "tf", overwrite=True)
    assert read_weights_info(target)["preprocessing"] == "tf"
    vgg16 = nnx.eval_shape(lambda: build_model("vgg16", rngs=nnx.Rngs(0), **TINY))
    with pytest.raises(ValueError, match="vgg19"):
        load_weights(vgg16, target)
    # A hand-edited or half-written weights folder is named before Orbax or the step fails.
    info = json.loads((target / "weights.json").read_text())
    (target / "weights.json").write_text(json.dumps(info | {"preprocessing": "bgr"}))
    with pytest.raises(ValueError, match="preprocessing 'bgr' is none of caffe, tf, torch, none"):
        load_weights(other, target)
    (target / "weights.json").write_text(json.dumps(info))
    shutil.rmtree(target / "state")
    with pytest.raises(FileNotFoundError, match="has no state/ folder: an incomplete conversion"):
        load_weights(other, target)


def test_a_damaged_weights_json_is_an_error_naming_it(tmp_path):
    # A cut or hand-edited weights.json (an interrupted copy to another machine) was a bare
    # JSONDecodeError ("Expecting ',' delimiter: line 1 column ...") or KeyError: 'config'.
    model = nnx.eval_shape(lambda: build_model("vgg19", rngs=nnx.Rngs(0), **TINY))
    target = tmp_path / "weights"
    (target / "state").mkdir(parents=True)
    text = json.dumps({"arch": "vgg19", "config": {"width": 0.125}, "preprocessing": "caffe"})
    (target / "weights.json").write_text(text[:30])
    with pytest.raises(ValueError, match=r"weights/weights.json is damaged"):
        load_weights(model, target)
    (target / "weights.json").write_text(json.dumps({"arch": "vgg19", "preprocessing": "tf"}))
    with pytest.raises(ValueError, match=r"weights/weights.json is damaged.*'config'"):
        read_weights_info(target)


def test_require_weights_file_says_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        require_weights_file(tmp_path / "missing.h5", "vgg19")
    message = str(error.value)
    for text in (
        "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "vgg19-dcbbabbd.pth",
        "scripts/convert_weights.py --arch vgg19",
    ):
        assert text in message
    existing = tmp_path / "w.h5"
    existing.write_bytes(b"")
    assert require_weights_file(existing, "vgg19") == existing


def test_convert_weights_script(keras_vgg19, tmp_path, capsys, monkeypatch):
    _, h5_path, reference = keras_vgg19
    spec = importlib.util.spec_from_file_location(
        "convert_weights", REPO_ROOT / "scripts" / "convert_weights.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "vgg19_keras"
    argv = ["--arch", "vgg19", "--from", "keras", "--input", str(h5_path), "--output", str(out)]
    assert script.main(argv) == 0
    from sapsam_jax.models import _registry

    with monkeypatch.context() as patch:  # refused before the whole conversion, not after it
        patch.setitem(_registry.LOADERS, "keras", lambda *_: pytest.fail("converted first"))
        assert script.main(argv) == 2  # exists: an error line naming --overwrite, no traceback
    assert capsys.readouterr().err == f"error: {out} exists; pass --overwrite to replace it\n"
    missing = ["--arch", "vgg19", "--from", "keras", "--input", str(tmp_path / "no.h5")]
    assert script.main([*missing, "--output", str(tmp_path / "x")]) == 2
    assert "vgg19_weights_tf_dim_ordering" in capsys.readouterr().err  # what to download
    info = json.loads((out / "weights.json").read_text())
    assert info["preprocessing"] == "caffe" and not info["has_head"]
    model = build_model("vgg19", rngs=nnx.Rngs(0), weights=out)
    np.testing.assert_array_equal(
        model.block5.conv4.kernel[...], reference.block5.conv4.kernel[...]
    )
    assert model.preprocessing == "caffe"


def test_overwrite_refuses_an_output_that_is_a_file(keras_vgg19, tmp_path, capsys):
    # --output naming a file (the downloaded .h5 itself, say) with --overwrite renamed the file
    # to a hidden '.NAME.old-*', wrote the directory in its place, then failed on rmtree of the
    # file: exit status 2 after replacing it, and the hidden file left behind.
    spec = importlib.util.spec_from_file_location(
        "convert_weights", REPO_ROOT / "scripts" / "convert_weights.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    path = tmp_path / "vgg19.h5"
    shutil.copyfile(keras_vgg19[1], path)
    before = path.read_bytes()
    argv = ["--arch", "vgg19", "--from", "keras", "--input", str(path), "--output", str(path)]
    assert script.main([*argv, "--overwrite"]) == 2
    assert f"{path} exists and is not a directory" in capsys.readouterr().err
    with pytest.raises(ValueError, match="exists and is not a directory"):
        save_weights(keras_vgg19[2], path, "caffe", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["vgg19.h5"] and path.read_bytes() == before
