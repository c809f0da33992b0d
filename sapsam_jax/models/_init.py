"""He-normal initialisation that compiles once, whatever the layer shape.

`jax.random.normal(key, shape)` compiles a threefry kernel for every new shape; VGG19 and
InceptionV3 have dozens of distinct kernel shapes, which made building a model on CPU take
minutes. Drawing fixed-size chunks reuses one compiled kernel; only a cheap slice/reshape/scale
is compiled per shape. The values are an (untruncated) Gaussian like any other draw.
"""

import math
from functools import partial

import jax
import jax.numpy as jnp

CHUNK = 1 << 16  # draws per compiled call


@partial(jax.jit, static_argnames=("shape",))
def _assemble(chunks, shape, std):
    flat = chunks[0] if len(chunks) == 1 else jnp.concatenate(chunks)
    return flat[: math.prod(shape)].reshape(shape) * std


def he_normal(key, shape, dtype=jnp.float32):
    """Gaussian, mean 0, std sqrt(2 / fan_in) (He et al. 2015); fan_in = prod(shape[:-1])
    for HWIO conv kernels and (in, out) dense kernels."""
    shape = tuple(shape)
    n_chunks = -(-math.prod(shape) // CHUNK)
    chunks = [
        jax.random.normal(jax.random.fold_in(key, i), (CHUNK,), dtype) for i in range(n_chunks)
    ]
    std = jnp.asarray(math.sqrt(2.0 / math.prod(shape[:-1])), dtype)
    return _assemble(chunks, shape, std)
