"""The paper's classifier head (paper 2.4), shared by VGG19 and InceptionV3.

The ImageNet classifier is discarded; global average pooling of the backbone features feeds
fc1 (1024, ReLU) -> dropout 0.5 -> fc2 (1024, ReLU) -> logits (2). Softmax is left to the loss.
"""

import jax.numpy as jnp
from flax import nnx

from ._init import he_normal

# "randomly initialized by sampling from a Gaussian distribution with biases set to 0" (paper 2.4).
# We use He-normal (untruncated Gaussian, std = sqrt(2 / fan_in)), the scale that keeps ReLU
# activations at unit variance; a fixed std such as 0.01 would shrink the logits by ~1e3.
HEAD_KERNEL_INIT = he_normal
HEAD_BIAS_INIT = nnx.initializers.zeros_init()
HEAD_LAYERS = ("fc1", "fc2", "logits")


class ClassifierHead(nnx.Module):
    """Global average pooling -> fc1 -> dropout -> fc2 -> logits (float32)."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        units: int = 1024,
        dropout_rate: float = 0.5,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        def dense(n_in, n_out):
            return nnx.Linear(
                n_in,
                n_out,
                kernel_init=HEAD_KERNEL_INIT,
                bias_init=HEAD_BIAS_INIT,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )

        self.fc1 = dense(in_features, units)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.fc2 = dense(units, units)
        self.logits = dense(units, num_classes)

    def __call__(self, features):
        x = jnp.mean(features, axis=(1, 2))
        x = nnx.relu(self.fc1(x))
        x = self.dropout(x)
        x = nnx.relu(self.fc2(x))
        # Logits in float32 whatever the compute dtype, so softmax/cross-entropy stay accurate.
        return self.logits(x).astype(jnp.float32)

    def reset(self, rngs: nnx.Rngs, last: int = 2) -> None:
        """Re-draw the last ``last`` dense layers (paper 2.4: survival resets fc2 and logits)."""
        if not 1 <= last <= len(HEAD_LAYERS):
            raise ValueError(f"last must be in 1..{len(HEAD_LAYERS)}, got {last}")
        for name in HEAD_LAYERS[-last:]:
            layer = getattr(self, name)
            kernel = layer.kernel[...]
            layer.kernel[...] = HEAD_KERNEL_INIT(rngs.params(), kernel.shape, kernel.dtype)
            layer.bias[...] = jnp.zeros_like(layer.bias[...])
