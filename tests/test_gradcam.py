"""Grad-CAM (paper eq. (1)) against independent computations on tiny NNX CNNs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sapsam_jax.explain import CAM_METHODS, grad_cam, normalize_maps


class TinyCNN(nnx.Module):
    """Two convolutions, GAP, dense + dropout + BatchNorm head: the models' split protocol."""

    layer_names = ("conv1", "conv2")
    default_cam_layer = "conv2"

    def __init__(self, num_classes=3, *, rngs):
        self.conv1 = nnx.Conv(3, 4, (3, 3), strides=2, rngs=rngs)
        self.conv2 = nnx.Conv(4, 5, (3, 3), rngs=rngs)
        self.fc = nnx.Linear(5, 6, rngs=rngs)
        self.bn = nnx.BatchNorm(6, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.logits = nnx.Linear(6, num_classes, rngs=rngs)

    def forward_to(self, x, layer):
        h = jax.nn.relu(self.conv1(x))
        if layer == "conv1":
            return h
        return jax.nn.relu(self.conv2(h))

    def forward_from(self, h, layer):
        if layer == "conv1":
            h = jax.nn.relu(self.conv2(h))
        h = jax.nn.relu(self.bn(self.fc(h.mean(axis=(1, 2)))))
        return self.logits(self.dropout(h))

    def __call__(self, x):
        return self.forward_from(self.forward_to(x, "conv2"), "conv2")


class GapLinear(nnx.Module):
    """Conv -> GAP -> linear: Grad-CAM is known in closed form, ReLU(sum_k W_kc / Z A^k)."""

    layer_names = ("conv",)
    default_cam_layer = "conv"

    def __init__(self, num_classes=2, *, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), strides=2, rngs=rngs)
        self.linear = nnx.Linear(4, num_classes, rngs=rngs)

    def forward_to(self, x, layer):
        return jax.nn.relu(self.conv(x))

    def forward_from(self, h, layer):
        return self.linear(h.mean(axis=(1, 2)))


@pytest.fixture
def images():
    return jax.random.uniform(jax.random.key(1), (3, 12, 10, 3))


@pytest.fixture
def tiny():
    model = TinyCNN(rngs=nnx.Rngs(0))
    # Non-trivial running statistics, so eval mode (running stats) differs from batch stats.
    model.bn.mean.set_value(jnp.linspace(-0.2, 0.3, 6))
    model.bn.var.set_value(jnp.linspace(0.5, 2.0, 6))
    return model


@pytest.fixture
def x64():
    """Float64 JAX for the finite-difference reference, restored afterwards."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


def _reference_cam(acts, grads, method):
    """NumPy Grad-CAM / HiResCAM / Grad-CAM++ (pytorch-grad-cam's closed form), NHWC, low-res."""
    if method == "gradcam":
        weights = grads.mean(axis=(1, 2), keepdims=True)
    elif method == "hirescam":
        weights = grads
    else:
        g2, g3 = grads**2, grads**3
        aij = g2 / (2 * g2 + acts.sum(axis=(1, 2), keepdims=True) * g3 + 1e-6)
        aij = np.where(grads != 0, aij, 0)
        weights = (np.maximum(grads, 0) * aij).sum(axis=(1, 2), keepdims=True)
    return np.maximum((weights * acts).sum(-1), 0)


def _finite_difference_grads(model, acts, targets, layer, eps=1e-5):
    """Central differences of each sample's target logit w.r.t. every feature-map entry (f64).

    All 2 x size perturbations go through ``forward_from`` as one batch (eval mode: samples are
    independent).
    """
    model = nnx.merge(*nnx.split(model))
    model.eval()
    acts = np.asarray(acts, np.float64)
    n, size = acts.shape[0], int(np.prod(acts.shape[1:]))
    steps = (eps * np.eye(size)).reshape(size, 1, *acts.shape[1:])
    batch = np.concatenate([acts + steps, acts - steps]).reshape(-1, *acts.shape[1:])
    logits = np.asarray(model.forward_from(jnp.asarray(batch), layer)).reshape(2, size, n, -1)
    scores = logits[..., np.arange(n), targets]  # (2, size, n)
    grads = (scores[0] - scores[1]) / (2 * eps)
    return grads.T.reshape(acts.shape)


@pytest.mark.parametrize("layer", ["conv1", "conv2"])
def test_matches_finite_differences(tiny, images, x64, layer):
    targets = np.array([0, 2, 1])
    acts = np.asarray(tiny.forward_to(images.astype(jnp.float64), layer), np.float64)
    grads = _finite_difference_grads(tiny, acts, targets, layer)
    for method in CAM_METHODS:
        low = _reference_cam(acts, grads, method)
        expected = _bilinear_reference(low, (12, 10))
        maps = grad_cam(tiny, images.astype(jnp.float32), targets, layer=layer, method=method)
        assert maps.shape == (3, 12, 10) and maps.dtype == jnp.float32
        scale = np.abs(expected).max()
        assert scale > 0, method
        np.testing.assert_allclose(maps, expected, atol=1e-4 * scale, rtol=1e-3, err_msg=method)


def test_gap_linear_closed_form(images):
    model = GapLinear(rngs=nnx.Rngs(2))
    acts = np.asarray(model.forward_to(images, "conv"))
    z = acts.shape[1] * acts.shape[2]
    weights = np.asarray(model.linear.kernel[...])[:, 1] / z
    low = np.maximum((acts * weights).sum(-1), 0)
    expected = _bilinear_reference(low, images.shape[1:3])
    np.testing.assert_allclose(grad_cam(model, images, 1), expected, rtol=1e-5, atol=1e-7)


def test_hirescam_equals_gradcam_for_gap_linear_head(images):
    # With GAP -> linear the gradient is the same at every position, so the element-wise
    # HiResCAM weights equal Grad-CAM's spatial means (Draelos & Carin 2020).
    model = GapLinear(rngs=nnx.Rngs(3))
    np.testing.assert_allclose(
        grad_cam(model, images, 0, method="hirescam"), grad_cam(model, images, 0), rtol=1e-5
    )


def test_per_sample_targets_match_one_at_a_time(tiny, images):
    targets = np.array([2, 0, 1])
    batched = grad_cam(tiny, images, targets, method="gradcam++")
    for n, t in enumerate(targets):
        single = grad_cam(tiny, images[n : n + 1], int(t), method="gradcam++")
        np.testing.assert_allclose(batched[n], single[0], rtol=1e-5, atol=1e-7)


def test_eval_mode_ignores_dropout_and_keeps_model_mode(tiny, images):
    tiny.train()
    first, logits = grad_cam(tiny, images, 1, return_logits=True)
    second = grad_cam(tiny, images, 1)
    assert not tiny.dropout.deterministic  # the caller's model is left in train mode
    np.testing.assert_array_equal(first, second)
    tiny.eval()
    np.testing.assert_allclose(first, grad_cam(tiny, images, 1), rtol=1e-6)
    np.testing.assert_allclose(logits, tiny(images), rtol=1e-5, atol=1e-6)


def _bilinear_reference(low, shape):
    """Half-pixel bilinear upsampling by scikit-image (independent of jax.image.resize)."""
    from skimage.transform import resize

    low = np.asarray(low, np.float64)
    return np.stack(
        [resize(m, shape, order=1, mode="edge", anti_aliasing=False) for m in low]
    ).astype(np.float32)


def test_upsampling_is_bilinear(images):
    model = GapLinear(rngs=nnx.Rngs(4))
    raw = grad_cam(model, images, 0, layer="conv")
    # 12 x 10 input, stride 2 -> 6 x 5 feature map, upsampled bilinearly to the input size.
    acts = model.forward_to(images, "conv")
    low = jax.nn.relu((acts * model.linear.kernel[...][:, 0] / 30).sum(-1))
    np.testing.assert_allclose(raw, _bilinear_reference(low, (12, 10)), rtol=1e-4, atol=1e-6)


def test_batch_size_chunks_give_same_maps(tiny, images):
    whole = grad_cam(tiny, images, np.array([0, 1, 2]))
    chunked = grad_cam(tiny, images, np.array([0, 1, 2]), batch_size=2)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-8)
    for bad in (0, -2):  # -2 sliced backwards into empty chunks; 0 quietly meant "all at once"
        with pytest.raises(ValueError, match=f"batch_size must be >= 1 .* not {bad}"):
            grad_cam(tiny, images, 0, batch_size=bad)


def test_normalize_maps():
    maps = jnp.stack([jnp.zeros((4, 5)), jnp.arange(20.0).reshape(4, 5) + 3])
    out = normalize_maps(maps)
    np.testing.assert_array_equal(out[0], 0)
    assert float(out[1].min()) == 0 and float(out[1].max()) == 1


def test_rejects_bad_arguments(tiny, images):
    with pytest.raises(ValueError, match="method"):
        grad_cam(tiny, images, 0, method="scorecam")
    with pytest.raises(ValueError, match="shape"):
        grad_cam(tiny, images, np.array([0, 1]))
    with pytest.raises(TypeError):
        grad_cam(tiny, images, 0.5)
    for outside in (3, -1):  # tiny has 3 outputs: one_hot would make every map silently 0
        with pytest.raises(ValueError, match="outside the model's 3 outputs"):
            grad_cam(tiny, images, outside)


def test_real_vgg19_tiny():
    from sapsam_jax import models

    model = models.VGG19Tiny(num_classes=2, rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
    maps, logits = grad_cam(model, x, np.array([0, 1]), return_logits=True)
    assert maps.shape == (2, 32, 32) and np.isfinite(np.asarray(maps)).all()
    model.eval()
    expected = nnx.jit(lambda m, x: m(x))(model, x)  # eager VGG is slow on CPU
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
