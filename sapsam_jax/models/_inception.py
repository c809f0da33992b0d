"""Inception v3 (Szegedy et al. 2016) as in `keras.applications.InceptionV3`, in Flax NNX, NHWC.

Details a naive port gets wrong, all as Keras does them:
- every convolution is conv (no bias) -> BatchNorm, center only (no scale), eps 1e-3 -> ReLU;
- the stem's 'valid' paddings, and 'valid' stride-2 reductions in mixed3 / mixed8;
- the 3x3 stride-1 'same' average pools in the branches divide by the number of *valid* pixels
  (Keras ``AveragePooling2D(padding="same")``); torchvision's port counts the zero padding
  (``count_include_pad=True``), so ``pool_include_pad`` selects the convention of the weights;
- branch concatenation order.
Attribute names follow torchvision (``branch5x5_1``...), module names follow Keras (``mixed0``...).
Each block lists its convolutions in ``conv_names`` in Keras creation order, which is how the
unnamed Keras layers (``conv2d_17``) are matched when loading weights.
"""

from functools import partial

import jax.numpy as jnp
from flax import nnx

from ._backbone import Backbone, scaled
from ._init import he_normal

BN_EPSILON = 1e-3  # Keras BatchNormalization default; torchvision BasicConv2d uses 0.001 too.
BN_MOMENTUM = 0.99  # Keras default (moving = 0.99 * moving + 0.01 * batch).
CONV_INIT = he_normal  # backbone init when not loading ImageNet weights
MIXED_NAMES = tuple(f"mixed{i}" for i in range(11))


class ConvBN(nnx.Module):
    """Conv (no bias) -> BatchNorm (center; scale only for torchvision weights) -> ReLU."""

    def __init__(
        self,
        in_channels,
        channels,
        kernel,
        strides=1,
        padding="SAME",
        *,
        bn_scale,
        dtype,
        param_dtype,
        rngs,
    ):
        kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        self.conv = nnx.Conv(
            in_channels,
            channels,
            kernel,
            strides,
            padding=padding,
            use_bias=False,
            kernel_init=CONV_INIT,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.bn = self._batch_norm(channels, bn_scale, dtype, param_dtype)

    @staticmethod
    def _batch_norm(channels, bn_scale, dtype, param_dtype):
        # BatchNorm has no random parameters; a fixed Rngs keeps set_bn_scale deterministic.
        return nnx.BatchNorm(
            channels,
            use_scale=bn_scale,
            epsilon=BN_EPSILON,
            momentum=BN_MOMENTUM,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=nnx.Rngs(0),
        )

    def set_bn_scale(self, bn_scale: bool) -> None:
        """Add (scale=1) or drop the BatchNorm scale, keeping bias and moving statistics."""
        if self.bn.use_scale == bn_scale:
            return
        old = self.bn
        new = self._batch_norm(old.num_features, bn_scale, old.dtype, old.param_dtype)
        for name in ("bias", "mean", "var"):
            getattr(new, name).set_value(getattr(old, name).get_value())
        new.use_running_average = old.use_running_average
        self.bn = new

    def __call__(self, x):
        return nnx.relu(self.bn(self.conv(x)))


def max_pool_3x3_s2(x):
    return nnx.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


def avg_pool_3x3(x, include_pad: bool):
    """3x3 stride-1 'same' average pool; Keras excludes the padding from the mean."""
    return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding="SAME", count_include_pad=include_pad)


class _Adder:
    """Creates a block's ConvBN layers and records their names in creation order."""

    def __init__(self, block, conv, c):
        self.block, self.conv, self.c = block, conv, c
        block.conv_names = ()

    def __call__(self, name, in_channels, channels, kernel, strides=1, padding="SAME"):
        out = self.c(channels)
        setattr(self.block, name, self.conv(in_channels, out, kernel, strides, padding))
        self.block.conv_names += (name,)
        return out


class _Block(nnx.Module):
    """Shared by the blocks: the average-pool convention."""

    pool_include_pad: bool = False

    def _avg_pool(self, x):
        return avg_pool_3x3(x, self.pool_include_pad)


class InceptionStem(_Block):
    """Everything before mixed0: 3 convs, max pool, 2 convs, max pool (Keras paddings)."""

    def __init__(self, conv, c, pool_include_pad=False):
        add = _Adder(self, conv, c)
        self.pool_include_pad = pool_include_pad
        n = add("conv1a_3x3", 3, 32, 3, 2, "VALID")
        n = add("conv2a_3x3", n, 32, 3, 1, "VALID")
        n = add("conv2b_3x3", n, 64, 3)
        n = add("conv3b_1x1", n, 80, 1, 1, "VALID")
        n = add("conv4a_3x3", n, 192, 3, 1, "VALID")
        self.out_channels = n

    def __call__(self, x):
        x = self.conv2b_3x3(self.conv2a_3x3(self.conv1a_3x3(x)))
        x = max_pool_3x3_s2(x)
        x = self.conv4a_3x3(self.conv3b_1x1(x))
        return max_pool_3x3_s2(x)


class InceptionA(_Block):
    """mixed0-2 (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, cin, pool_features, conv, c, pool_include_pad=False):
        add = _Adder(self, conv, c)
        self.pool_include_pad = pool_include_pad
        b1 = add("branch1x1", cin, 64, 1)
        add("branch5x5_1", cin, 48, 1)
        b5 = add("branch5x5_2", c(48), 64, 5)
        add("branch3x3dbl_1", cin, 64, 1)
        add("branch3x3dbl_2", c(64), 96, 3)
        b3 = add("branch3x3dbl_3", c(96), 96, 3)
        bp = add("branch_pool", cin, pool_features, 1)
        self.out_channels = b1 + b5 + b3 + bp

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(self._avg_pool(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    """mixed3 (35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin, conv, c, pool_include_pad=False):
        add = _Adder(self, conv, c)
        self.pool_include_pad = pool_include_pad
        b3 = add("branch3x3", cin, 384, 3, 2, "VALID")
        add("branch3x3dbl_1", cin, 64, 1)
        add("branch3x3dbl_2", c(64), 96, 3)
        bd = add("branch3x3dbl_3", c(96), 96, 3, 2, "VALID")
        self.out_channels = b3 + bd + cin

    def __call__(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([b3, bd, max_pool_3x3_s2(x)], axis=-1)


class InceptionC(_Block):
    """mixed4-7 (17x17): 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1."""

    def __init__(self, cin, c7, conv, c, pool_include_pad=False):
        add = _Adder(self, conv, c)
        self.pool_include_pad = pool_include_pad
        b1 = add("branch1x1", cin, 192, 1)
        add("branch7x7_1", cin, c7, 1)
        add("branch7x7_2", c(c7), c7, (1, 7))
        b7 = add("branch7x7_3", c(c7), 192, (7, 1))
        add("branch7x7dbl_1", cin, c7, 1)
        add("branch7x7dbl_2", c(c7), c7, (7, 1))
        add("branch7x7dbl_3", c(c7), c7, (1, 7))
        add("branch7x7dbl_4", c(c7), c7, (7, 1))
        bd = add("branch7x7dbl_5", c(c7), 192, (1, 7))
        bp = add("branch_pool", cin, 192, 1)
        self.out_channels = b1 + b7 + bd + bp

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for name in ("branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5"):
            bd = getattr(self, name)(bd)
        bp = self.branch_pool(self._avg_pool(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
    """mixed8 (17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin, conv, c, pool_include_pad=False):
        add = _Adder(self, conv, c)
        self.pool_include_pad = pool_include_pad
        add("branch3x3_1", cin, 192, 1)
        b3 = add("branch3x3_2", c(192), 320, 3, 2, "VALID")
        add("branch7x7x3_1", cin, 192, 1)
        add("branch7x7x3_2", c(192), 192, (1, 7))
        add("branch7x7x3_3", c(192), 192, (7, 1))
        b7 = add("branch7x7x3_4", c(192), 192, 3, 2, "VALID")
        self.out_channels = b3 + b7 + cin

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for name in ("branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"):
            b7 = getattr(self, name)(b7)
        return jnp.concatenate([b3, b7, max_pool_3x3_s2(x)], axis=-1)


class InceptionE(_Block):
    """mixed9-10 (8x8): 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | avgpool-1x1."""

    def __init__(self, cin, conv, c, pool_include_pad=False):
        add = _Adder(self, conv, c)
        self.pool_include_pad = pool_include_pad
        b1 = add("branch1x1", cin, 320, 1)
        add("branch3x3_1", cin, 384, 1)
        b3 = add("branch3x3_2a", c(384), 384, (1, 3))
        b3 += add("branch3x3_2b", c(384), 384, (3, 1))
        add("branch3x3dbl_1", cin, 448, 1)
        add("branch3x3dbl_2", c(448), 384, 3)
        bd = add("branch3x3dbl_3a", c(384), 384, (1, 3))
        bd += add("branch3x3dbl_3b", c(384), 384, (3, 1))
        bp = add("branch_pool", cin, 192, 1)
        self.out_channels = b1 + b3 + bd + bp

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
        bp = self.branch_pool(self._avg_pool(x))
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def _mixed_blocks(cin, conv, c, pool_include_pad):
    """mixed0..mixed10 in order (Keras names; torchvision Mixed_5b..Mixed_7c)."""
    blocks = []
    specs = [
        (InceptionA, 32),
        (InceptionA, 64),
        (InceptionA, 64),
        (InceptionB,),
        (InceptionC, 128),
        (InceptionC, 160),
        (InceptionC, 160),
        (InceptionC, 192),
        (InceptionD,),
        (InceptionE,),
        (InceptionE,),
    ]
    for cls, *args in specs:
        block = cls(cin, *args, conv, c, pool_include_pad)
        blocks.append(block)
        cin = block.out_channels
    return blocks


# Keras's minimum: mixed8's stride-2 'valid' pools leave 1x1 at 75x75.
INCEPTION_MIN_INPUT_SIZE = 75


class InceptionV3(Backbone):
    """Inception v3 backbone (Keras layout) + the paper's head; ``features`` is Keras ``mixed10``.

    ``pool_include_pad`` / ``bn_scale`` select the torchvision conventions (the torchvision
    loader sets both); the defaults are Keras's.
    """

    def __init__(
        self,
        num_classes: int = 2,
        *,
        rngs: nnx.Rngs,
        width: float = 1.0,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        head_units: int = 1024,
        dropout_rate: float = 0.5,
        pool_include_pad: bool = False,
        bn_scale: bool = False,
    ):
        self.arch = "inception_v3"
        self._set_options(num_classes, width, head_units, dropout_rate, dtype, param_dtype)
        self.pool_include_pad, self.bn_scale = pool_include_pad, bn_scale
        conv = partial(ConvBN, bn_scale=bn_scale, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        c = partial(scaled, width=width)
        self.stem = InceptionStem(conv, c)
        for name, block in zip(
            MIXED_NAMES,
            _mixed_blocks(self.stem.out_channels, conv, c, pool_include_pad),
            strict=True,
        ):
            setattr(self, name, block)
        self.block_names = ("stem",) + MIXED_NAMES
        self.layer_names = self.block_names  # mixed10 holds the last convolutions
        self.default_cam_layer = "mixed10"
        self.min_input_size = INCEPTION_MIN_INPUT_SIZE
        self._make_head(self.mixed10.out_channels, rngs)

    @property
    def config(self) -> dict:
        return super().config | dict(pool_include_pad=self.pool_include_pad, bn_scale=self.bn_scale)

    def set_conventions(
        self, *, pool_include_pad: bool | None = None, bn_scale: bool | None = None
    ) -> None:
        """Switch between the Keras and torchvision conventions in place (used by the loaders)."""
        blocks = [getattr(self, b) for b in self.block_names]
        if pool_include_pad is not None:
            self.pool_include_pad = pool_include_pad
            for block in blocks:
                block.pool_include_pad = pool_include_pad
        if bn_scale is not None:
            self.bn_scale = bn_scale
            for block, name in self.conv_paths():
                getattr(getattr(self, block), name).set_bn_scale(bn_scale)

    def conv_paths(self) -> list[tuple[str, str]]:
        """(block, conv) attribute paths in Keras creation order (``conv2d``, ``conv2d_1``, ...)."""
        return [(b, c) for b in self.block_names for c in getattr(self, b).conv_names]

    def _stages(self):
        return [(name, getattr(self, name)) for name in self.block_names]


# For tests only: 1/8 of the channels and a 32-unit head.
InceptionV3Tiny = partial(InceptionV3, width=0.125, head_units=32)
