"""Optimizer, frozen blocks and the jitted train/eval steps (paper 2.4, 3.1-3.2).

One small jitted step does augmentation, input preparation, forward, backward and the SGD update on
the device; model and optimizer buffers are donated. Frozen blocks get zero updates through
``optax.multi_transform`` and keep their BatchNorm statistics (their modules stay in eval mode).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sapsam_jax.data import augment_batch
from sapsam_jax.models import preprocess_input

FROZEN, TRAINABLE = "frozen", "trainable"


@dataclass(frozen=True)
class StepSpec:
    """The static part of a step: how raw cache images become model inputs, and the loss."""

    image_size: tuple[int, int]
    preprocessing: str
    multi_label: bool = False
    # Multi-label only: weight of each sign's positive term in the loss (None: 1 for all).
    positive_weight: tuple[float, ...] | None = None
    max_rotation_deg: float = 20.0
    zoom_range: tuple[float, float] = (0.8, 1.2)
    flip: bool = False
    augment: bool = True


def frozen_block_names(model, count: int) -> tuple[str, ...]:
    """The first ``count`` backbone blocks (paper 3.1: "frozen layers = the first two blocks")."""
    names = tuple(model.block_names)
    if not 0 <= count <= len(names):  # a negative count would slice from the end
        raise ValueError(f"cannot freeze {count} blocks: the model has {len(names)} ({names})")
    return names[:count]


def _param_labels(frozen: tuple[str, ...]):
    """Label every parameter 'frozen' or 'trainable' by the block its path starts with."""

    def label(path, _):
        head = path[0]
        name = getattr(head, "key", getattr(head, "name", head))
        return FROZEN if str(name) in frozen else TRAINABLE

    return lambda params: jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(model, cfg, steps_per_epoch: int) -> nnx.Optimizer:
    """SGD with momentum (paper 3.1) or Adam, optional linear warm-up and gradient clipping,
    frozen first blocks. ``cfg.momentum`` is Adam's first-moment decay ``b1`` (the role momentum
    plays in SGD; both default to 0.9), so ``--momentum`` means something for either."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    schedule = (
        optax.warmup_constant_schedule(0.0, cfg.learning_rate, warmup)
        if warmup
        else cfg.learning_rate
    )
    base = (
        optax.sgd(schedule, momentum=cfg.momentum)
        if cfg.optimizer == "sgd"
        else optax.adam(schedule, b1=cfg.momentum)
    )
    if cfg.grad_clip_norm is not None:
        base = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), base)
    frozen = frozen_block_names(model, cfg.frozen_blocks)
    tx = optax.multi_transform(
        {TRAINABLE: base, FROZEN: optax.set_to_zero()}, _param_labels(frozen)
    )
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


def set_train_mode(model, frozen: tuple[str, ...]) -> None:
    """Train mode for the model, but frozen blocks keep their BatchNorm statistics (eval mode)."""
    model.train()
    for name in frozen:
        getattr(model, name).eval()


def prepare_inputs(images: jax.Array, spec: StepSpec) -> jax.Array:
    """Cache images (N, H, W, 1|3) in [0, 1] -> model input: resized, 3 channels, normalised."""
    images = images.astype(jnp.float32)
    n, height, width, channels = images.shape
    if (height, width) != tuple(spec.image_size):
        images = jax.image.resize(images, (n, *spec.image_size, channels), method="bilinear")
    if channels == 1:  # grayscale whole-scan projections feed RGB backbones (paper 2.3)
        images = jnp.repeat(images, 3, axis=-1)
    return preprocess_input(images, spec.preprocessing)


def per_sample_loss(
    logits: jax.Array, labels: jax.Array, multi_label: bool, positive_weight=None
) -> jax.Array:
    """Categorical cross-entropy on the softmax output (paper 3.1); per-sign sigmoid if multi.

    ``positive_weight`` (multi-label) scales each sign's positive term, as ``pos_weight`` in
    PyTorch's ``BCEWithLogitsLoss``: with ``n_negative / n_positive`` of the training set a sign
    weighs as if its classes were balanced (paper 2.3), which one multi-label sample set cannot be.
    """
    logits = logits.astype(jnp.float32)
    if not multi_label:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    labels = labels.astype(jnp.float32)
    weight = 1.0 if positive_weight is None else jnp.asarray(positive_weight, jnp.float32)
    positive = weight * labels * jax.nn.log_sigmoid(logits)
    negative = (1.0 - labels) * jax.nn.log_sigmoid(-logits)
    return -(positive + negative).mean(-1)


def probabilities(logits: jax.Array, multi_label: bool) -> jax.Array:
    """P(positive): softmax column 1, or the per-sign sigmoids."""
    logits = logits.astype(jnp.float32)
    return jax.nn.sigmoid(logits) if multi_label else jax.nn.softmax(logits, axis=-1)[:, 1]


@functools.cache
def make_train_step(spec: StepSpec):
    """Compile (once per spec) the step: augment -> prepare -> forward/backward -> update."""

    @nnx.jit(donate_argnums=(0, 1))
    def train_step(model, optimizer, images, labels, key):
        aug_key, dropout_key = jax.random.split(key)
        if spec.augment:
            images = augment_batch(
                images,
                aug_key,
                max_rotation_deg=spec.max_rotation_deg,
                zoom_range=spec.zoom_range,
                flip=spec.flip,
            )
        inputs = prepare_inputs(images, spec)
        nnx.reseed(model, dropout=dropout_key)  # dropout masks depend only on (seed, step)

        def objective(model):
            logits = model(inputs)
            losses = per_sample_loss(logits, labels, spec.multi_label, spec.positive_weight)
            return losses.mean(), logits

        (loss, logits), grads = nnx.value_and_grad(objective, has_aux=True)(model)
        optimizer.update(model, grads)
        return loss, probabilities(logits, spec.multi_label)

    return train_step


@functools.cache
def make_eval_step(spec: StepSpec):
    """Compile the evaluation step: no augmentation, model in eval mode (set by the caller)."""

    @nnx.jit
    def eval_step(model, images, labels):
        logits = model(prepare_inputs(images, spec))
        losses = per_sample_loss(logits, labels, spec.multi_label, spec.positive_weight)
        return losses, probabilities(logits, spec.multi_label)

    return eval_step
