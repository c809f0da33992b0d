"""Marker-based watershed for the refined lung mask (paper 2.1), on both backends.

The edge map is quantised to a fixed number of levels (reference [5] of the paper rescales its
Sobel map to 0..255). The CPU floods it with ``skimage.segmentation.watershed``. cuCIM has no
watershed, so the GPU floods with ``kernels/watershed.cu``: levels are swept in increasing order
and, per level, a synchronous step labels every unlabelled voxel at or below the level from its
earliest-flooded neighbour, until nothing changes. Flooding keys ``level * KEY_STRIDE + step``
follow scikit-image's queue order (by level, then first come first served), so the kernel and
its NumPy twin :func:`flood_numpy` agree exactly and both agree with scikit-image up to plateau
ties: where neighbours carry equal keys the first in C order wins, not scikit-image's push order
(0.01 % of voxels differ on 256-level random maps, 1.3 % on 4 levels; 99.99 % agreement on real
CT, ``tests/test_mask.py``).
"""

from __future__ import annotations

import itertools

import numpy as np

from ..backend import get_backend

KEY_STRIDE = 1 << 20  # flooding steps per level stay far below 2**20
UNLABELLED_KEY = np.iinfo(np.int32).max
MAX_LEVELS = (UNLABELLED_KEY // KEY_STRIDE) + 1  # keys must fit in int32 on the GPU
_THREADS = 256


def level_dtype(levels: int):
    """Smallest unsigned dtype holding ``levels`` levels."""
    if not 2 <= levels <= MAX_LEVELS:
        raise ValueError(f"levels must be in [2, {MAX_LEVELS}], got {levels}")
    return np.uint8 if levels <= 256 else np.uint16


def quantize_edges(edge, mask, levels: int, xp=np):
    """Edge map -> integer levels ``0..levels-1``, scaled by its maximum inside ``mask``."""
    edge = xp.asarray(edge, dtype=xp.float32)
    top = float(edge[mask].max()) if bool(mask.any()) else 0.0
    scale = (levels - 1) / top if top > 0 else 0.0
    q = xp.clip(xp.rint(edge * xp.float32(scale)), 0, levels - 1)
    return q.astype(level_dtype(levels))


def watershed(edge, markers, mask, *, levels: int = 256, connectivity: int = 1, backend=None):
    """Labels of a marker-based watershed of ``edge`` inside ``mask`` (0 outside it)."""
    bk = get_backend(backend)
    q = quantize_edges(edge, mask, levels, bk.xp)
    if bk.is_gpu:
        # CuPy Backend: cuCIM has no watershed; our flooding kernel gives the same labels.
        return flood_gpu(q, markers, mask, connectivity)
    return bk.ski.segmentation.watershed(q, markers, connectivity=connectivity, mask=mask)


def neighbour_offsets(connectivity: int) -> list[tuple[int, int, int]]:
    """3-D neighbour offsets in C order, as the kernel visits them."""
    return [
        d
        for d in itertools.product((-1, 0, 1), repeat=3)
        if 0 < sum(c != 0 for c in d) <= connectivity
    ]


def _as_3d(array):
    return array.reshape((1,) * (3 - array.ndim) + array.shape)


def _inside(mask, shape, xp):
    return xp.ones(shape, bool) if mask is None else xp.asarray(mask, dtype=bool)


def _initial_state(levels, markers, inside, xp):
    """Int32 labels (markers inside the mask) and flooding keys (markers: their own level)."""
    labels = xp.where(inside, xp.asarray(markers), 0).astype(xp.int32)
    keys = xp.where(labels > 0, levels.astype(xp.int32) * KEY_STRIDE, UNLABELLED_KEY)
    return labels, keys.astype(xp.int32)


# --- NumPy twin ------------------------------------------------------------------------------


def flood_numpy(levels, markers, mask=None, connectivity: int = 1) -> np.ndarray:
    """NumPy twin of the GPU flooding: same steps and keys, vectorised over the flood front."""
    shape = levels.shape
    pad = ((1, 1),) * 3  # a False border keeps flat neighbour indices in range
    lv = np.pad(_as_3d(np.asarray(levels)), pad).astype(np.int64)
    inside = np.pad(_as_3d(_inside(mask, shape, np)), pad)
    labels, keys = _initial_state(lv, np.pad(_as_3d(np.asarray(markers)), pad), inside, np)
    strides = np.array(lv.strides) // lv.itemsize
    offsets = np.array([np.dot(d, strides) for d in neighbour_offsets(connectivity)])
    state = (lv.ravel(), inside.ravel(), labels.ravel(), keys.ravel(), offsets)
    for level, voxels in _voxels_by_level(*state[:3]):
        _flood_level(level, voxels, state)
    crop = tuple(slice(1, -1) for _ in range(3))
    return labels[crop].reshape(shape)


def _voxels_by_level(lv, inside, labels):
    """(level, flat indices) for each level holding unlabelled voxels or markers."""
    eligible = np.flatnonzero(inside | (labels > 0))
    order = eligible[np.argsort(lv[eligible], kind="stable")]
    values, starts = np.unique(lv[order], return_index=True)
    return zip(values.tolist(), np.split(order, starts[1:]), strict=True)


def _flood_level(level, voxels, state):
    """Synchronous steps at one level until the flood front is empty (kernel semantics)."""
    lv, inside, labels, keys, offsets = state
    # New this level: its own unlabelled voxels, and the neighbours of its markers (active now).
    is_marker = labels[voxels] > 0
    front = np.concatenate([voxels[~is_marker], _neighbours(voxels[is_marker], offsets)])
    front = _floodable(np.unique(front), level, state)
    step = 1
    while front.size:
        step_key = level * KEY_STRIDE + step
        nb = front[:, None] + offsets[None, :]
        pick = keys[nb].argmin(axis=1)  # first minimum: the kernel's C-order tie rule
        source = nb[np.arange(front.size), pick]
        hit = keys[source] < step_key
        new = front[hit]
        labels[new], keys[new] = labels[source[hit]], step_key
        front = _floodable(np.unique(_neighbours(new, offsets)), level, state)
        step += 1


def _neighbours(voxels, offsets):
    return (voxels[:, None] + offsets[None, :]).ravel()


def _floodable(voxels, level, state):
    lv, inside, labels = state[:3]
    return voxels[inside[voxels] & (labels[voxels] == 0) & (lv[voxels] <= level)]


# --- GPU ---------------------------------------------------------------------------------------


def flood_gpu(levels, markers, mask=None, connectivity: int = 1):
    """Flood quantised ``levels`` from ``markers`` on the GPU (kernels/watershed.cu)."""
    import cupy

    from ._kernels import watershed_flood_kernel

    shape = levels.shape
    lv = cupy.ascontiguousarray(_as_3d(levels))
    inside = cupy.ascontiguousarray(_as_3d(_inside(mask, shape, cupy)))
    labels, keys = _initial_state(lv, _as_3d(cupy.asarray(markers)), inside, cupy)
    kernel = watershed_flood_kernel(lv.dtype.itemsize, connectivity)
    args = (lv, inside.view(cupy.uint8), labels, keys)
    dims = tuple(np.int32(n) for n in lv.shape)
    blocks = (min(-(-lv.size // _THREADS), 1 << 16),)
    changed = cupy.zeros(1, cupy.int32)
    active = lv[inside | (labels > 0)]
    for level in cupy.unique(active).get().tolist():
        for step in range(1, KEY_STRIDE):
            changed.fill(0)
            step_key = np.int32(level * KEY_STRIDE + step)
            kernel(blocks, (_THREADS,), (*args, np.int32(level), step_key, changed, *dims))
            if not int(changed.get()[0]):  # one host sync per step
                break
    return labels.reshape(shape)
