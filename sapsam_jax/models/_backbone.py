"""What VGG19 and InceptionV3 share: channel scaling, the split-point API, and the head wiring.

A backbone is an ordered list of named stages; `forward_to` / `forward_from` split the list at a
stage so Grad-CAM (paper 2.5) can differentiate the logits w.r.t. any stage's activations.
"""

from collections.abc import Callable

import jax.numpy as jnp
from flax import nnx

from ._head import ClassifierHead


def scaled(channels: int, width: float) -> int:
    """Channel count scaled by ``width`` (1.0 = the published architecture), at least 1."""
    return max(1, int(round(channels * width)))


def dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


class Backbone(nnx.Module):
    """Base class: subclasses set ``block_names``, ``layer_names``, ``head`` and ``_stages``."""

    arch: str
    block_names: tuple[str, ...]
    layer_names: tuple[str, ...]
    default_cam_layer: str
    min_input_size: int  # smaller images leave no pixel at the end of the backbone

    def _stages(self) -> list[tuple[str, Callable]]:
        raise NotImplementedError

    def _set_options(self, num_classes, width, head_units, dropout_rate, dtype, param_dtype):
        """The constructor options every backbone records (``config`` reads them back)."""
        self.num_classes, self.width, self.head_units = num_classes, width, head_units
        self.dropout_rate = dropout_rate
        self.preprocessing = "none"  # input convention; the weight loaders set it
        self.dtype, self.param_dtype = dtype_name(dtype), dtype_name(param_dtype)

    def _make_head(self, in_channels: int, rngs: nnx.Rngs) -> None:
        """The paper's head (paper 2.4) on ``in_channels`` backbone features."""
        self.head = ClassifierHead(
            in_channels,
            self.num_classes,
            units=self.head_units,
            dropout_rate=self.dropout_rate,
            dtype=jnp.dtype(self.dtype),
            param_dtype=jnp.dtype(self.param_dtype),
            rngs=rngs,
        )

    @property
    def config(self) -> dict:
        """Constructor arguments that rebuild this architecture (Orbax weight folders)."""
        return dict(
            arch=self.arch,
            num_classes=self.num_classes,
            width=self.width,
            head_units=self.head_units,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    def _index(self, layer: str) -> int:
        if layer not in self.layer_names:
            raise ValueError(
                f"unknown layer {layer!r} for {self.arch}; expected one of {self.layer_names}"
            )
        return self.layer_names.index(layer)

    def _check_input(self, x) -> None:
        """Refuse images below the smallest size (static shapes, so also under jit): their
        backbone output is empty and the head's average pool would make NaN logits."""
        if x.ndim < 3 or min(x.shape[-3:-1]) < self.min_input_size:
            size = self.min_input_size
            raise ValueError(
                f"{self.arch} needs images (N, H, W, C) of at least {size}x{size} pixels, "
                f"got shape {tuple(x.shape)}"
            )

    def features(self, x):
        """Backbone output (Keras ``include_top=False``), NHWC."""
        self._check_input(x)
        for _, stage in self._stages():
            x = stage(x)
        return x

    def forward_to(self, x, layer: str):
        """Activations after stage ``layer`` (e.g. the Grad-CAM layer)."""
        stop = self._index(layer)
        self._check_input(x)
        for _, stage in self._stages()[: stop + 1]:
            x = stage(x)
        return x

    def forward_from(self, h, layer: str):
        """Logits from the activations ``h`` of stage ``layer``."""
        start = self._index(layer)
        for _, stage in self._stages()[start + 1 :]:
            h = stage(h)
        return self.head(h)

    def __call__(self, x):
        """Class logits (float32); softmax is applied by the loss / predict."""
        return self.head(self.features(x))

    def reset_head(self, rngs: nnx.Rngs, last: int = 2) -> None:
        """Re-initialise the last ``last`` dense layers of the head (paper 2.4, survival)."""
        self.head.reset(rngs, last)
