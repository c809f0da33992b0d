"""sapsam_jax.models on tiny (width 1/8) models: API contract, head, modes, dtypes, preprocessing.

Parity with Keras / torchvision at full width is in test_weights.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sapsam_jax.models import (
    PREPROCESSING,
    VGG,
    InceptionV3,
    InceptionV3Tiny,
    VGG19Tiny,
    build_model,
    preprocess_input,
)
from sapsam_jax.models._inception import avg_pool_3x3
from sapsam_jax.models._init import he_normal

# Smallest inputs each architecture accepts (VGG: 5 poolings; Inception: Keras min_size 75).
INPUT_SHAPES = {"vgg19": (2, 32, 32, 3), "inception_v3": (2, 75, 75, 3)}
TINY = {"vgg19": VGG19Tiny, "inception_v3": InceptionV3Tiny}
BF16_RTOL = 5e-2  # bf16 keeps 8 mantissa bits; errors compound over 16-20 conv layers


def _input(arch, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=INPUT_SHAPES[arch]), jnp.float32)


@pytest.fixture(scope="module", params=["vgg19", "inception_v3"])
def tiny(request):
    """(arch, model in eval mode, input, eager logits): built once per architecture."""
    arch = request.param
    model = TINY[arch](rngs=nnx.Rngs(0))
    model.eval()
    x = _input(arch)
    return arch, model, x, model(x)


def test_shapes_and_names(tiny):
    arch, model, x, logits = tiny
    assert logits.shape == (2, 2) and logits.dtype == jnp.float32
    features = model.features(x)
    assert features.ndim == 4 and features.shape[0] == 2
    assert features.shape[-1] == model.head.fc1.in_features
    for name in model.block_names:
        assert isinstance(getattr(model, name), nnx.Module)
    assert model.default_cam_layer in model.layer_names
    if arch == "vgg19":
        assert model.block_names == tuple(f"block{i}" for i in range(1, 6))
        assert model.default_cam_layer == "block5_conv4" and "block5_conv4" in model.layer_names
        assert features.shape[-1] == 64  # 512 / 8
    else:
        assert model.block_names == ("stem",) + tuple(f"mixed{i}" for i in range(11))
        assert model.default_cam_layer == "mixed10"
        assert features.shape[-1] == 256  # 2048 / 8


def test_forward_to_from_compose_for_every_layer(tiny):
    _, model, x, logits = tiny
    for layer in model.layer_names:
        h = model.forward_to(x, layer)
        np.testing.assert_allclose(
            model.forward_from(h, layer), logits, rtol=1e-5, atol=1e-6, err_msg=layer
        )
    np.testing.assert_allclose(model.forward_to(x, model.layer_names[-1]), model.features(x))
    with pytest.raises(ValueError, match="unknown layer"):
        model.forward_to(x, "nope")


def test_dropout_follows_train_and_eval_mode():
    model = VGG19Tiny(rngs=nnx.Rngs(1))
    x = _input("vgg19")
    model.eval()
    np.testing.assert_array_equal(model(x), model(x))
    model.train()
    assert not model.head.dropout.deterministic
    assert not np.allclose(model(x), model(x))


def test_batchnorm_follows_train_and_eval_mode():
    model = nnx.eval_shape(lambda: InceptionV3Tiny(rngs=nnx.Rngs(0)))
    bn = model.mixed10.branch_pool.bn
    assert not bn.use_running_average  # NNX modules start in train mode
    model.eval()
    assert bn.use_running_average and model.head.dropout.deterministic


def test_bf16_compute_close_to_float32(tiny):
    arch, model, x, logits = tiny
    half = nnx.eval_shape(lambda: TINY[arch](rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
    nnx.update(half, nnx.state(model))  # same float32 parameters
    half.eval()
    features = nnx.jit(lambda m, x: m.features(x))(half, x)
    assert features.dtype == jnp.bfloat16
    assert half.head.fc1.kernel[...].dtype == jnp.float32
    reference = model.features(x)
    error = np.abs(np.asarray(features, np.float32) - reference).max()
    assert error <= BF16_RTOL * np.abs(reference).max(), error


def test_tiny_model_trains_end_to_end():
    """One SGD step (paper 3.1: momentum 0.9) on the 1/8-width VGG19 lowers the batch loss."""
    import optax

    model = VGG19Tiny(rngs=nnx.Rngs(0), dropout_rate=0.0)
    optimizer = nnx.Optimizer(model, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)
    x, y = _input("vgg19"), jnp.array([0, 1])

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(3)]
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses


def test_reset_head_redraws_last_two_layers():
    model = VGG19Tiny(rngs=nnx.Rngs(0))
    before = {n: np.asarray(getattr(model.head, n).kernel[...]) for n in ("fc1", "fc2", "logits")}
    model.head.logits.bias[...] = jnp.ones_like(model.head.logits.bias[...])
    model.reset_head(nnx.Rngs(5))
    np.testing.assert_array_equal(model.head.fc1.kernel[...], before["fc1"])
    for name in ("fc2", "logits"):
        assert not np.allclose(getattr(model.head, name).kernel[...], before[name])
    np.testing.assert_array_equal(model.head.logits.bias[...], 0.0)


def test_head_matches_the_paper():
    model = nnx.eval_shape(lambda: VGG19Tiny(rngs=nnx.Rngs(0), head_units=1024))
    assert model.head.fc1.kernel.shape == (64, 1024)
    assert model.head.fc2.kernel.shape == (1024, 1024)
    assert model.head.logits.kernel.shape == (1024, 2)
    assert model.head.dropout.rate == 0.5


def test_he_normal_is_a_gaussian_with_he_scale():
    w = np.asarray(he_normal(jax.random.key(0), (3, 3, 64, 200)))
    assert abs(w.mean()) < 0.01 * w.std()
    np.testing.assert_allclose(w.std(), np.sqrt(2 / (3 * 3 * 64)), rtol=0.02)
    assert np.abs(w).max() > 3.5 * w.std()  # not truncated at 2 sigma


@pytest.mark.parametrize("width", [0.01, 0.125, 1.0])
def test_width_scales_vgg_channels(width):
    vgg = nnx.eval_shape(lambda: VGG(rngs=nnx.Rngs(0), width=width))
    assert vgg.block1.conv1.kernel.shape[-1] == max(1, round(64 * width))
    assert vgg.block5.conv4.kernel.shape[-1] == max(1, round(512 * width))


def test_width_scales_inception_channels():
    inception = nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0), width=0.01))
    assert inception.stem.conv1a_3x3.conv.kernel.shape[-1] == 1  # never 0 channels
    assert inception.mixed9.branch3x3dbl_1.conv.kernel.shape[-1] == 4  # 448 * 0.01
    assert inception.mixed0.branch_pool.bn.scale is None  # Keras: BatchNorm without scale


def test_build_model_and_config():
    model = nnx.eval_shape(lambda: build_model("vgg19", 3, rngs=nnx.Rngs(0), width=0.25))
    assert model.config["arch"] == "vgg19" and model.config["num_classes"] == 3
    assert model.preprocessing == "none"
    with pytest.raises(ValueError, match="unknown arch"):
        build_model("resnet50", rngs=nnx.Rngs(0))


def test_average_pool_padding_conventions():
    x = jnp.ones((1, 4, 4, 1))
    # Keras AveragePooling2D(padding="same") averages valid pixels only: ones stay ones.
    np.testing.assert_allclose(avg_pool_3x3(x, include_pad=False), 1.0)
    # torchvision counts the zero padding: a corner sees 4 of 9 pixels.
    np.testing.assert_allclose(avg_pool_3x3(x, include_pad=True)[0, 0, 0, 0], 4 / 9, rtol=1e-6)


@pytest.mark.parametrize("source", ["caffe", "tf", "torch"])
def test_preprocess_input_matches_keras(source):
    from keras.applications import imagenet_utils, inception_v3, vgg19

    x = np.random.default_rng(0).uniform(size=(2, 5, 7, 3)).astype(np.float32)
    reference = {
        "caffe": lambda: vgg19.preprocess_input(x * 255.0),
        "tf": lambda: inception_v3.preprocess_input(x * 255.0),
        "torch": lambda: imagenet_utils.preprocess_input(x * 255.0, mode="torch"),
    }[source]()
    np.testing.assert_allclose(preprocess_input(x, source), reference, rtol=1e-5, atol=1e-4)


def test_preprocess_input_none_and_errors():
    x = jnp.full((1, 2, 2, 3), 0.5)
    assert set(PREPROCESSING) == {"caffe", "tf", "torch", "none"}
    np.testing.assert_array_equal(preprocess_input(x, "none"), x)
    with pytest.raises(ValueError, match="unknown preprocessing"):
        preprocess_input(x, "imagenet")
    with pytest.raises(TypeError):
        preprocess_input(np.zeros((2, 2, 3), np.uint8), "tf")


def test_input_below_the_minimum_size_is_refused(tiny):
    # Below 32x32 (VGG, five 2x2 pools) or 75x75 (InceptionV3) the backbone output had a zero
    # dimension and the head's global average pool made the logits NaN, silently (Keras refuses).
    arch, model, _, _ = tiny
    too_small = {"vgg19": (31, 40), "inception_v3": (74, 90)}[arch]
    x = jnp.zeros((1, *too_small, 3))
    minimum = INPUT_SHAPES[arch][1]
    with pytest.raises(ValueError, match=rf"at least {minimum}x{minimum}.*\(1, {too_small[0]}"):
        model(x)
    with pytest.raises(ValueError, match=rf"at least {minimum}x{minimum}"):
        model.forward_to(x, model.default_cam_layer)
    # The table training checks --image-size against (without building a model) is the models'.
    from sapsam_jax.models import MIN_INPUT_SIZE

    assert MIN_INPUT_SIZE[arch] == model.min_input_size == minimum
