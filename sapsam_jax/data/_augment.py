"""On-device 2-D augmentation in JAX, paper 2.3.

"the projection images were randomly rotated by +-20 degrees and randomly scaled between 80% and
120% of their original size". Each sample gets its own angle and zoom from a seeded key; the whole
batch is one jitted, vmapped bilinear resampling, so augmentation never leaves the accelerator.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def rotate_zoom(image: jax.Array, angle_deg, zoom, flip=False) -> jax.Array:
    """Rotate ``image`` (H, W, C) by ``angle_deg`` about its centre, scale its content by ``zoom``.

    Bilinear, zero outside. The angle has ``scipy.ndimage.rotate``'s sense (counter-clockwise as
    displayed with row 0 on top); ``zoom > 1`` enlarges the content (the paper's 120%). ``flip``
    (a bool, may be traced) mirrors the columns first, before the rotation.
    """
    height, width = image.shape[:2]
    rows, cols = jnp.meshgrid(
        jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32), indexing="ij"
    )
    centre_r, centre_c = (height - 1) / 2.0, (width - 1) / 2.0
    theta = jnp.deg2rad(jnp.asarray(angle_deg, jnp.float32))
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    # Inverse map: each output pixel samples the input at R(-theta)(p - c) / zoom + c, written in
    # (row, col) coordinates where row grows downwards (hence the signs).
    dr, dc = rows - centre_r, cols - centre_c
    src_r = (cos * dr + sin * dc) / zoom + centre_r
    src_c = (-sin * dr + cos * dc) / zoom + centre_c
    src_c = jnp.where(flip, 2 * centre_c - src_c, src_c)

    def sample(channel):
        return jax.scipy.ndimage.map_coordinates(
            channel, [src_r, src_c], order=1, mode="constant", cval=0.0
        )

    out = jax.vmap(sample, in_axes=2, out_axes=2)(image.astype(jnp.float32))
    return out.astype(image.dtype)


@functools.partial(jax.jit, static_argnames=("max_rotation_deg", "zoom_range", "flip"))
def augment_batch(
    images: jax.Array,
    key: jax.Array,
    *,
    max_rotation_deg: float = 20.0,
    zoom_range: tuple[float, float] = (0.8, 1.2),
    flip: bool = False,
) -> jax.Array:
    """Rotate (uniform in +-max_rotation_deg) and zoom each image of an (N, H, W, C) batch;
    with ``flip``, mirror a random half of them left-right as well (not in the paper)."""
    key_angle, key_zoom = jax.random.split(key)
    n = images.shape[0]
    angles = jax.random.uniform(key_angle, (n,), minval=-max_rotation_deg, maxval=max_rotation_deg)
    zooms = jax.random.uniform(key_zoom, (n,), minval=zoom_range[0], maxval=zoom_range[1])
    # A key of its own (folded in, not split off): angles and zooms stay those of flip=False.
    flips = jax.random.bernoulli(jax.random.fold_in(key, 2), 0.5, (n,)) & flip
    return jax.vmap(rotate_zoom)(images, angles, zooms, flips)
