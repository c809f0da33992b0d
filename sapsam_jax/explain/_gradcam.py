"""Grad-CAM (paper 2.5, eq. (1)) and two variants, batched and jitted, for splittable models.

A model only needs the split protocol of ``sapsam_jax.models`` (docs/ARCHITECTURE.md, "Models"):
``forward_to(x, layer) -> A`` (NHWC feature maps) and ``forward_from(A, layer) -> logits`` with
``forward_from(forward_to(x, L), L) == model(x)``. The class score y^c of eq. (1) is the
pre-softmax logit of the target class; its gradient w.r.t. A comes from one ``jax.vjp`` of
``forward_from`` per batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

CAM_METHODS = ("gradcam", "gradcam++", "hirescam")
# Grad-CAM++ denominator guard, the value pytorch-grad-cam uses (base_cam GradCAMPlusPlus).
_GRADCAM_PP_EPS = 1e-6


def grad_cam(
    model,
    images,
    target,
    *,
    layer: str | None = None,
    method: str = "gradcam",
    batch_size: int | None = None,
    return_logits: bool = False,
):
    """Class activation maps of ``images`` (N, H, W, C) for class ``target``, shape (N, H, W).

    Paper eq. (1): ``L^c = ReLU(sum_k alpha_k^c A^k)`` with ``alpha_k^c`` the spatial mean of
    ``d y^c / d A^k``, where ``A`` are the feature maps of ``layer`` (default
    ``model.default_cam_layer``, the last convolution) and ``y^c`` the logit of class c. The map is
    bilinearly upsampled (``jax.image.resize``) to the input's H x W. ``method`` picks
    ``"gradcam"`` (eq. (1)), ``"gradcam++"`` (Chattopadhyay et al. 2018) or ``"hirescam"``
    (element-wise gradient x activation, Draelos & Carin 2020).

    ``target`` is an int (same class for every image) or an (N,) integer array (one per image).
    The model runs in eval mode (dropout off, BatchNorm running statistics) on a copy, so a model
    left in train mode gives the same maps and is not modified. Maps are raw (not normalised; see
    :func:`normalize_maps`), float32. ``batch_size`` splits large inputs into fixed-size chunks
    (the last one padded, so one compiled function serves all). With ``return_logits`` the
    (N, num_classes) logits come back too, as ``(maps, logits)``.
    """
    if method not in CAM_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(CAM_METHODS)}")
    if batch_size is not None and batch_size < 1:  # range() would step backwards or not at all
        raise ValueError(f"batch_size must be >= 1 (or None: all at once), not {batch_size}")
    layer = model.default_cam_layer if layer is None else layer
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
    targets = _as_targets(target, images.shape[0])
    if images.shape[0] == 0:
        raise ValueError("images is empty")
    graphdef, state = _eval_split(model)
    maps, logits = [], []
    for start, stop in _chunks(images.shape[0], batch_size):
        x, t = _pad(images[start:stop], batch_size), _pad(targets[start:stop], batch_size)
        m, z = _cam_batch(graphdef, state, x, t, layer=layer, method=method)
        maps.append(m[: stop - start])
        logits.append(z[: stop - start])
    maps, logits = jnp.concatenate(maps), jnp.concatenate(logits)
    _check_targets(targets, logits.shape[-1])
    return (maps, logits) if return_logits else maps


def normalize_maps(maps):
    """Scale each map to [0, 1] by its own maximum over its minimum (for display and scoring).

    ``(m - min) / (max - min)`` per map over its last two axes; a constant map (in particular an
    all-zero Grad-CAM, where ReLU removed everything) becomes all zeros rather than NaN.
    """
    maps = jnp.asarray(maps, jnp.float32)
    lo = maps.min(axis=(-2, -1), keepdims=True)
    span = maps.max(axis=(-2, -1), keepdims=True) - lo
    return jnp.where(span > 0, (maps - lo) / jnp.where(span > 0, span, 1.0), 0.0)


def cam_weights(acts, grads, method: str):
    """Per-position weights w (N, u, v, K) such that the map is ``ReLU(sum_k w * A^k)``.

    ``acts``/``grads`` are A and dy^c/dA, NHWC. Grad-CAM (eq. (1)): w = alpha_k^c, the spatial
    mean of the gradients (Z = u * v), broadcast over positions. HiResCAM: w = the gradient itself;
    when the head is GAP -> linear the gradient is the same W_kc / Z at every position, so HiResCAM
    equals Grad-CAM exactly. Grad-CAM++: the closed
    form for an exponential score exp(y^c), whose higher derivatives are powers of the first.
    """
    if method == "gradcam":
        return jnp.broadcast_to(grads.mean(axis=(1, 2), keepdims=True), grads.shape)
    if method == "hirescam":
        return grads
    if method == "gradcam++":
        return jnp.broadcast_to(_gradcam_pp_alpha(acts, grads), grads.shape)
    raise ValueError(f"unknown method {method!r}")


def _gradcam_pp_alpha(acts, grads):
    """Grad-CAM++ channel weights (Chattopadhyay et al. 2018, eq. 19), pytorch-grad-cam's form.

    a_ij = g^2 / (2 g^2 + sum_ab A_ab * g^3) (0 where g == 0), w_k = sum_ij a_ij ReLU(g_ij).
    """
    g2 = grads**2
    g3 = g2 * grads
    sum_a = acts.sum(axis=(1, 2), keepdims=True)
    aij = g2 / (2.0 * g2 + sum_a * g3 + _GRADCAM_PP_EPS)
    aij = jnp.where(grads != 0, aij, 0.0)
    return (jnp.maximum(grads, 0.0) * aij).sum(axis=(1, 2), keepdims=True)


@functools.partial(jax.jit, static_argnames=("graphdef", "layer", "method"))
def _cam_batch(graphdef, state, images, targets, *, layer, method):
    """One batch: forward to ``layer``, one VJP of the summed target logits, eq. (1), upsample.

    jax.jit caches one executable per (graphdef, layer, method, input shape): the graph
    definition is hashable and static, the weights are traced arguments.
    """
    model = nnx.merge(graphdef, state)
    acts = model.forward_to(images, layer)
    logits, vjp = jax.vjp(lambda h: model.forward_from(h, layer), acts)
    # Samples are independent in eval mode, so the gradient of sum_n y^{c_n}_n w.r.t. A gives
    # every sample's own dy^c/dA in a single backward pass.
    cotangent = jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype)
    (grads,) = vjp(cotangent)
    acts, grads = acts.astype(jnp.float32), grads.astype(jnp.float32)
    cam = jax.nn.relu((cam_weights(acts, grads, method) * acts).sum(axis=-1))
    n, h, w = images.shape[:3]
    cam = jax.image.resize(cam, (n, h, w), method="bilinear")
    return cam, logits.astype(jnp.float32)


def _eval_split(model):
    """(graphdef, state) of an eval-mode copy; the caller's model keeps its mode (dropout, 2.4)."""
    copy = nnx.merge(*nnx.split(model))
    copy.eval()
    return nnx.split(copy)


def _as_targets(target, n: int):
    targets = np.asarray(target)
    if not np.issubdtype(targets.dtype, np.integer):
        raise TypeError(f"target must be an int or integer array, got dtype {targets.dtype}")
    if targets.ndim == 0:
        targets = np.full((n,), int(targets))
    if targets.shape != (n,):
        raise ValueError(f"target must be an int or shape ({n},), got shape {targets.shape}")
    return jnp.asarray(targets, jnp.int32)


def _check_targets(targets, n_out: int) -> None:
    """Targets must index the model's outputs: one_hot of any other index is all zeros, and
    every map would silently be 0. (Checked once the logits' width is known: no extra pass.)"""
    bad = np.asarray(targets)
    bad = bad[(bad < 0) | (bad >= n_out)]
    if bad.size:
        raise ValueError(f"target {bad.tolist()} outside the model's {n_out} outputs")


def _chunks(n: int, batch_size: int | None):
    step = n if not batch_size else batch_size
    return [(s, min(s + step, n)) for s in range(0, n, max(step, 1))]


def _pad(x, batch_size: int | None):
    """Pad the leading axis to ``batch_size`` by repeating the first row (no recompilation)."""
    if not batch_size or x.shape[0] == batch_size:
        return x
    pad = jnp.repeat(x[:1], batch_size - x.shape[0], axis=0)
    return jnp.concatenate([x, pad])
