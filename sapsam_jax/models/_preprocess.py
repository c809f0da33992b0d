"""Input normalisation matching the convention each set of pretrained weights was trained with.

Our projections are float images in [0, 1] (paper 2.3). ImageNet weights expect the normalisation
their framework used; the weight loaders return the matching ``source`` and checkpoints record it.
"""

import jax.numpy as jnp

# Keras `imagenet_utils` "caffe" mode: BGR channel means on the 0..255 scale.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
# torchvision ImageNet normalisation (RGB, on the 0..1 scale).
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)

PREPROCESSING = ("caffe", "tf", "torch", "none")


def preprocess_input(x, source: str):
    """Normalise ``x`` (NHWC or HWC, RGB, values in [0, 1]) for weights of the given ``source``.

    - ``"caffe"``: Keras VGG16/19 weights: ``x * 255``, RGB -> BGR, minus the ImageNet BGR mean.
    - ``"tf"``: Keras Inception weights (and torchvision Inception, whose pretrained model applies
      ``transform_input``, which amounts to the same thing): ``x * 2 - 1``.
    - ``"torch"``: torchvision weights: ``(x - mean) / std`` per RGB channel.
    - ``"none"``: unchanged (models trained from scratch).
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"preprocess_input expects a float image in [0, 1], got dtype {x.dtype}")
    if source == "caffe":
        return x[..., ::-1] * 255.0 - jnp.asarray(CAFFE_BGR_MEAN, x.dtype)
    if source == "tf":
        return x * 2.0 - 1.0
    if source == "torch":
        return (x - jnp.asarray(TORCH_MEAN, x.dtype)) / jnp.asarray(TORCH_STD, x.dtype)
    if source == "none":
        return x
    raise ValueError(f"unknown preprocessing source {source!r}; expected one of {PREPROCESSING}")
