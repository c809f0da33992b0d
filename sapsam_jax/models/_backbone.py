"""What VGG19 and InceptionV3 share: channel scaling, the split-point API, and the head wiring.

A backbone is an ordered list of named stages; `forward_to` / `forward_from` split the list at a
stage so Grad-CAM (paper 2.5) can differentiate the logits w.r.t. any stage's activations.
"""

from collections.abc import Callable

import jax.numpy as jnp
from flax import nnx


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

    def _stages(self) -> list[tuple[str, Callable]]:
        raise NotImplementedError

    def _index(self, layer: str) -> int:
        if layer not in self.layer_names:
            raise ValueError(
                f"unknown layer {layer!r} for {self.arch}; expected one of {self.layer_names}"
            )
        return self.layer_names.index(layer)

    def features(self, x):
        """Backbone output (Keras ``include_top=False``), NHWC."""
        for _, stage in self._stages():
            x = stage(x)
        return x

    def forward_to(self, x, layer: str):
        """Activations after stage ``layer`` (e.g. the Grad-CAM layer)."""
        stop = self._index(layer)
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
