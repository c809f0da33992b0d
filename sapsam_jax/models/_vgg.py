"""VGG (Simonyan & Zisserman 2015) as in `keras.applications.VGG19`, ported to Flax NNX, NHWC.

Each block is 3x3 'same' convolutions with ReLU followed by a 2x2 stride-2 max pool; Keras names
the layers ``block{b}_conv{i}`` and ``block{b}_pool``, which our attribute paths mirror
(``model.block1.conv1``).
"""

from functools import partial

import jax.numpy as jnp
from flax import nnx

from ._backbone import Backbone, scaled
from ._init import he_normal

# Convolutions per block and their channel counts (Keras applications / the VGG paper, table 1).
VGG_CHANNELS = (64, 128, 256, 512, 512)
VGG_ARCHS = {(2, 2, 3, 3, 3): "vgg16", (2, 2, 4, 4, 4): "vgg19"}
CONV_INIT = he_normal  # backbone init when not loading ImageNet weights


class VGGBlock(nnx.Module):
    """``n_convs`` x (3x3 conv + ReLU), then 2x2/2 max pool; convs are ``conv1``..``convN``."""

    def __init__(self, in_channels: int, channels: int, n_convs: int, *, dtype, param_dtype, rngs):
        self.conv_names = tuple(f"conv{i + 1}" for i in range(n_convs))
        for i, name in enumerate(self.conv_names):
            conv = nnx.Conv(
                in_channels if i == 0 else channels,
                channels,
                (3, 3),
                padding="SAME",
                kernel_init=CONV_INIT,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
            setattr(self, name, conv)

    def conv(self, name: str, x):
        return nnx.relu(getattr(self, name)(x))

    @staticmethod
    def pool(x):
        return nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")

    def __call__(self, x):
        for name in self.conv_names:
            x = self.conv(name, x)
        return self.pool(x)


class VGG(Backbone):
    """VGG backbone (``stages`` convs per block) + the paper's head.

    ``features`` is Keras ``block5_pool``. ``layer_names`` lists every conv
    (``block{b}_conv{i}``) and every block output (``block{b}``, = Keras ``block{b}_pool``).
    """

    def __init__(
        self,
        num_classes: int = 2,
        *,
        rngs: nnx.Rngs,
        stages: tuple[int, ...] = (2, 2, 4, 4, 4),
        width: float = 1.0,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        head_units: int = 1024,
        dropout_rate: float = 0.5,
    ):
        self.stages = tuple(stages)
        self.arch = VGG_ARCHS.get(self.stages, "vgg")
        self._set_options(num_classes, width, head_units, dropout_rate, dtype, param_dtype)
        self.block_names = tuple(f"block{b + 1}" for b in range(len(self.stages)))
        in_channels = 3
        for name, n_convs, channels in zip(
            self.block_names, self.stages, VGG_CHANNELS, strict=True
        ):
            channels = scaled(channels, width)
            block = VGGBlock(
                in_channels, channels, n_convs, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )
            setattr(self, name, block)
            in_channels = channels
        self.layer_names = tuple(
            layer
            for b, n in zip(self.block_names, self.stages, strict=True)
            for layer in [f"{b}_conv{i + 1}" for i in range(n)] + [b]
        )
        self.default_cam_layer = f"{self.block_names[-1]}_conv{self.stages[-1]}"
        self.min_input_size = vgg_min_input_size(self.stages)
        self._make_head(in_channels, rngs)

    @property
    def config(self) -> dict:
        return super().config | dict(stages=list(self.stages))

    def conv_paths(self) -> list[tuple[str, str]]:
        """(block, conv) attribute paths in network order (Keras name: ``{block}_{conv}``)."""
        return [(b, c) for b in self.block_names for c in getattr(self, b).conv_names]

    def _stages(self):
        stages = []
        for b in self.block_names:
            block = getattr(self, b)
            for c in block.conv_names:
                stages.append((f"{b}_{c}", partial(block.conv, c)))
            stages.append((b, block.pool))
        return stages


def vgg_min_input_size(stages) -> int:
    """Smallest image side a VGG of these blocks takes: one 2x2 pool per block."""
    return 2 ** len(stages)


VGG19 = partial(VGG, stages=(2, 2, 4, 4, 4))
VGG16 = partial(VGG, stages=(2, 2, 3, 3, 3))
# For tests only: 1/8 of the channels and a 32-unit head (~0.3 M parameters).
VGG19Tiny = partial(VGG19, width=0.125, head_units=32)
