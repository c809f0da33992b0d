"""Lung masks, paper 2.1, on NumPy or CuPy arrays (one source; ``# CuPy Backend:`` marks gaps).

Both masks start from the same internal markers (:func:`lung_air`): voxels below -570 HU inside
the body, kept when their 3-D component is lung (large, not gas, or enclosed by lung), minus the
trachea and extra-pulmonary bronchi.

- ``conservative`` (disease classification / survival): markers closed then opened, holes filled
  per axial slice.
- ``refined`` (sign labelling): a watershed of a Sobel edge map grows the markers within the
  intermediate-marker radius (10 px); a closing of each lung, i.e. the black top-hat added back,
  takes in the juxtapleural soft tissue the threshold misses (fungus balls, pleural thickening,
  tumours) within the external-marker radius (35 px); holes are filled per axial slice.

Pixel sizes are converted to mm at the paper's 0.9 mm grid and every morphological operation is
an exact Euclidean distance transform with ``sampling=spacing``, so the masks keep their physical
shape from 0.6 mm voxels to 5 mm slices. Usage and measured accuracy: README, "Lung segmentation".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import Backend, backend_of, get_backend, is_cupy_array, to_numpy
from ..config import SegmentationConfig
from ._watershed import watershed

METHODS = ("conservative", "refined")
# Axial-slice connectivity: faces within a slice (4-neighbours), or all 8 neighbours.
_SLICE_FACES = np.zeros((3, 3, 3), bool)
_SLICE_FACES[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
_SLICE_FULL = np.zeros((3, 3, 3), bool)
_SLICE_FULL[1] = True
_LUNG, _BACKGROUND = 2, 1  # watershed labels
# Balls of at most this many voxels are structuring elements, larger ones distance transforms.
_MAX_FOOTPRINT = 400
PAPER_SEGMENTATION = SegmentationConfig()


def lung_mask(
    hu,
    spacing,
    *,
    method: str = "refined",
    config: SegmentationConfig = PAPER_SEGMENTATION,
    backend=None,
):
    """Boolean lung mask of ``hu[k, j, i]`` (HU; spacing ``(dk, dj, di)`` mm), paper 2.1.

    ``method``: ``"conservative"`` (threshold, closing, opening) or ``"refined"`` (markers,
    watershed, top-hat). The mask has the shape and array type of ``hu``; ``backend=None`` runs
    where ``hu`` lives (CuPy arrays on the GPU).
    """
    return lung_masks(hu, spacing, methods=(method,), config=config, backend=backend)[method]


def lung_masks(
    hu,
    spacing,
    *,
    methods=METHODS,
    config: SegmentationConfig = PAPER_SEGMENTATION,
    backend=None,
) -> dict:
    """``{method: lung_mask(hu, spacing, method=method)}``, sharing the internal markers."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown method {sorted(unknown)}; expected one of {', '.join(METHODS)}")
    bk = backend_of(hu) if backend is None else get_backend(backend)
    volume = bk.asarray(hu if bk.is_gpu else to_numpy(hu))
    spacing = _check_spacing(spacing, volume)
    lung, airway = lung_air(volume, spacing, config=config, backend=bk)
    masks = {}
    for method in methods:
        mask = bk.xp.zeros(volume.shape, dtype=bool)
        box = _bounding_box(lung, _margin_mm(method, config), spacing)
        if box is not None:
            mask[box] = _METHODS[method](volume[box], lung[box], airway[box], spacing, config, bk)
        masks[method] = _like(mask, hu)
    return masks


def _like(mask, hu):
    """``mask`` as the array type of ``hu`` (NumPy stays NumPy, CuPy stays CuPy)."""
    if is_cupy_array(hu) == is_cupy_array(mask):
        return mask
    return get_backend("gpu").asarray(mask) if is_cupy_array(hu) else to_numpy(mask)


def _margin_mm(method: str, config: SegmentationConfig) -> float:
    """Crop margin around the markers that no step of ``method`` can see past."""
    if method == "conservative":
        return 2 * config.closing_radius_mm
    return config.intermediate_marker_radius_mm + 2 * config.tophat_radius_mm


def _check_spacing(spacing, volume) -> tuple[float, float, float]:
    if volume.ndim != 3:
        raise ValueError(f"hu must be a 3-D volume hu[k, j, i], got shape {volume.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive mm values (dk, dj, di), got {spacing}")
    return spacing


def _bounding_box(mask, margin_mm: float, spacing):
    """Slices around ``mask`` grown by ``margin_mm`` (+1 voxel), or None when it is empty."""
    box = []
    for axis, step in enumerate(spacing):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(to_numpy(mask.any(axis=other)))
        if hits.size == 0:
            return None
        pad = int(np.ceil(margin_mm / step)) + 1
        box.append(slice(max(int(hits[0]) - pad, 0), int(hits[-1]) + pad + 1))
    return tuple(box)


# --- internal markers ----------------------------------------------------------------------


def lung_air(hu, spacing, *, config: SegmentationConfig = PAPER_SEGMENTATION, backend=None):
    """Internal markers of paper 2.1 and the airway: ``(lung, airway)`` boolean volumes.

    ``lung``: voxels below ``threshold_hu`` inside the body whose 3-D component is lung (the
    largest lung-like ones, plus air that lung encloses), without the airway. ``airway``: the
    trachea and extra-pulmonary bronchi that were removed.
    """
    bk = backend_of(hu) if backend is None else get_backend(backend)
    below = hu < config.threshold_hu
    body = _inside_body(~below, spacing, config, bk)
    labels, count = bk.ndi.label(below & body)
    keep = _lung_components(labels, count, hu, spacing, config, bk)
    lung = keep[labels]
    if not bool(lung.any()):
        return lung, lung
    lung = _out_to_the_field_of_view(lung, below & ~body, hu, config, bk)
    airway = _airway(lung, hu, spacing, config, bk)
    return lung & ~airway, airway


def _inside_body(tissue, spacing, config, bk: Backend):
    """Voxels the patient's body encloses in their axial slice (not outside air or mattress).

    The body is the largest tissue component once a small in-plane erosion has cut the thin
    table shell that touches the patient's back (the mattress under the back would otherwise
    look enclosed).
    """
    steps = max(1, round(config.body_erosion_mm / min(spacing[1:])))
    # border_value=1: a body cut by the image edge (a small field of view) is not eaten from it.
    core = bk.ndi.binary_erosion(
        tissue, structure=bk.asarray(_SLICE_FACES), iterations=steps, border_value=1
    )
    labels, count = bk.ndi.label(core)
    if count == 0:
        return bk.xp.zeros(tissue.shape, dtype=bool)
    sizes = bk.xp.bincount(labels.ravel())
    sizes[0] = 0
    return _enclosed(labels != sizes.argmax(), bk, in_slice=True)


def _out_to_the_field_of_view(lung, open_air, hu, config, bk: Backend):
    """``lung`` with its cross-sections that reach the image edge (a field of view that cuts
    the lungs, common at small pixel sizes): in those slices the body does not enclose the lung,
    so :func:`_inside_body` took it for outside air and the slice lost its whole lung.

    ``open_air``: below-threshold voxels the body does not enclose in their slice. Their in-slice
    components that touch the lung in the slice above or below, and are not mostly pure air
    (outside air, and the scanner's padding, are below ``pure_air_hu``; parenchyma is not), join
    the lung, slice by slice, without their pure-air voxels (no outside air comes along).
    """
    xp = bk.xp
    labels, count = bk.ndi.label(open_air, structure=_SLICE_FACES)
    if count == 0:
        return lung
    _, gas_fraction = _component_stats(labels, count, hu, config.pure_air_hu, bk)
    lung_like = gas_fraction <= 0.5
    lung_like[0] = False
    joined = xp.zeros(count + 1, dtype=bool)
    for _ in range(lung.shape[0]):
        next_to = xp.zeros_like(lung)
        next_to[1:] |= lung[:-1]
        next_to[:-1] |= lung[1:]
        touching = xp.zeros(count + 1, dtype=bool)
        touching[labels[next_to]] = True
        new = touching & lung_like & ~joined
        if not bool(new.any()):
            break
        joined |= new
        lung = lung | (new[labels] & (hu >= config.pure_air_hu))
    return lung


def _enclosed(binary, bk: Backend, in_slice: bool):
    """Components of ``binary`` that do not touch the border: of their axial slice
    (``in_slice``, 2-D components) or of the volume (3-D components)."""
    xp = bk.xp
    structure = _SLICE_FACES if in_slice else None
    labels, count = bk.ndi.label(binary, structure=structure)
    rim = [labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]]
    if not in_slice:
        rim += [labels[0], labels[-1]]
    keep = xp.ones(count + 1, dtype=bool)
    keep[xp.concatenate([r.ravel() for r in rim])] = False
    keep[0] = False
    return keep[labels]


def _component_stats(labels, count, hu, below_hu: float, bk: Backend):
    """Per-label voxel count and fraction of voxels below ``below_hu``."""
    xp = bk.xp
    flat = labels.ravel()
    voxels = xp.bincount(flat, minlength=count + 1)
    below = xp.bincount(
        flat, weights=(hu < below_hu).ravel().astype(xp.float64), minlength=count + 1
    )
    return voxels, below / xp.maximum(voxels, 1)


def _lung_components(labels, count, hu, spacing, config, bk: Backend):
    """Boolean per label: the lungs, and the air pockets they enclose (cavities, bullae)."""
    xp = bk.xp
    voxels, gas_fraction = _component_stats(labels, count, hu, config.pure_air_hu, bk)
    volume_ml = voxels * (float(np.prod(spacing)) / 1000.0)
    large = volume_ml >= config.min_component_ml
    large[0] = False
    lung_like = large & (gas_fraction <= config.gas_fraction_max)
    if not bool(lung_like.any()):
        return xp.zeros(count + 1, dtype=bool)
    main = lung_like & (volume_ml >= config.keep_fraction * volume_ml[lung_like].max())
    pockets = (volume_ml >= config.min_pocket_ml) & ~main
    pockets[0] = False
    if bool(pockets.any()):
        enclosed = _shell_lung_fraction(labels, main, pockets, spacing, config, bk)
        main = main | (pockets & (enclosed >= config.enclosed_fraction))
    return main


def _shell_lung_fraction(labels, main, pockets, spacing, config, bk: Backend):
    """Per label: the fraction of the shell within the intermediate-marker radius around each
    pocket that is main lung (on the coarse grid: a shell's share needs no fine voxels)."""
    xp = bk.xp
    radius = config.intermediate_marker_radius_mm
    coarse = _Coarse.of(labels.shape, spacing, config.coarse_voxel_mm)
    labels = coarse.down(labels[_bounding_box(pockets[labels], radius, spacing)], bk)
    distance, nearest = bk.ndi.distance_transform_edt(
        ~pockets[labels], sampling=coarse.spacing, return_indices=True
    )
    owner = labels[tuple(nearest)]
    shell = (distance > 0) & (distance <= radius)
    around = xp.bincount(owner[shell], minlength=main.size)
    lung = xp.bincount(owner[shell & main[labels]], minlength=main.size)
    return lung / xp.maximum(around, 1)


def _airway(lung, hu, spacing, config, bk: Backend):
    """Trachea and main bronchi: the chain of small axial cross-sections that starts at the top
    of the lung air and is mostly air (lung apices are parenchyma, never mostly air)."""
    xp = bk.xp
    labels, count = bk.ndi.label(lung, structure=_SLICE_FACES)
    area_mm2 = xp.bincount(labels.ravel(), minlength=count + 1) * (spacing[1] * spacing[2])
    small = area_mm2 <= config.airway_max_area_mm2
    small[0] = False
    chains, n_chains = bk.ndi.label(small[labels])
    top = int(np.flatnonzero(to_numpy(lung.any(axis=(1, 2))))[-1])
    _, air_fraction = _component_stats(chains, n_chains, hu, config.airway_hu, bk)
    tube = air_fraction > 0.5  # median HU in the paper's air-like band
    tube[0] = False
    at_top = xp.zeros(n_chains + 1, dtype=bool)
    at_top[chains[top]] = True
    return _follow_airway((tube & at_top)[chains], lung, hu, spacing, config, bk)


def _follow_airway(airway, lung, hu, spacing, config, bk: Backend):
    """``airway`` continued below the slices where its cross-section joins a lung.

    There the chain of small cross-sections ends, though the trachea goes on: a thin wall and
    partial volume join it to the lung beside it. Slice by slice downward from the chain's lowest
    slice, the lumen components (< ``airway_hu``) that overlap the airway of the slice above join
    it, with the voxels next to them (the partial-volume wall), while they are small and the
    shell around them is mostly not lung (mediastinum; a bronchus inside the lung is ringed by
    parenchyma). The shell is the square ring from two voxels to one voxel plus
    ``airway_shell_mm`` beyond the lumen. A branch whose own chain ended higher up than the
    lowest one is not followed.
    """
    xp = bk.xp
    below_top = np.flatnonzero(to_numpy(airway.any(axis=(1, 2))))
    if below_top.size == 0:
        return airway
    airway = airway.copy()
    square = bk.asarray(np.ones((3, 3), bool))
    max_voxels = config.airway_max_area_mm2 / (spacing[1] * spacing[2])
    shell_steps = max(1, round(config.airway_shell_mm / min(spacing[1:])))
    for k in range(int(below_top[0]) - 1, -1, -1):
        labels, count = bk.ndi.label(lung[k] & (hu[k] < config.airway_hu) & ~airway[k])
        overlapping = xp.zeros(count + 1, dtype=bool)
        overlapping[labels[airway[k + 1]]] = True
        overlapping[0] = False
        added = False
        for label in to_numpy(xp.flatnonzero(overlapping)).tolist():
            lumen = labels == label
            if float(lumen.sum()) > max_voxels:
                continue
            wall = bk.ndi.binary_dilation(lumen, structure=square)
            shell = bk.ndi.binary_dilation(wall, structure=square, iterations=shell_steps) & ~wall
            if float((shell & lung[k]).sum()) > config.airway_shell_lung_max * float(shell.sum()):
                continue
            airway[k] |= wall & lung[k]
            added = True
        if not added:
            break
    return airway


# --- morphology with Euclidean balls in mm ----------------------------------------------------


def _ball(radius_mm: float, spacing) -> np.ndarray:
    """Voxel offsets within ``radius_mm`` (an ellipsoid in voxels when spacing is anisotropic)."""
    reach = [int(radius_mm // step) for step in spacing]
    axes = [np.arange(-n, n + 1) * step for n, step in zip(reach, spacing, strict=True)]
    grid = np.meshgrid(*axes, indexing="ij")
    return sum(g * g for g in grid) <= radius_mm * radius_mm


def _dilate(mask, radius_mm: float, spacing, bk: Backend):
    """Dilation by a ball: a structuring element when small, a distance transform otherwise
    (both give exactly the voxels within ``radius_mm``)."""
    ball = _ball(radius_mm, spacing)
    if ball.sum() <= _MAX_FOOTPRINT:
        return bk.ndi.binary_dilation(mask, structure=bk.asarray(ball))
    return bk.ndi.distance_transform_edt(~mask, sampling=spacing) <= radius_mm


def _erode(mask, radius_mm: float, spacing, bk: Backend):
    """Erosion by a ball; outside the array counts as background."""
    ball = _ball(radius_mm, spacing)
    if ball.sum() <= _MAX_FOOTPRINT:
        return bk.ndi.binary_erosion(mask, structure=bk.asarray(ball), border_value=0)
    inner = tuple(slice(1, -1) for _ in range(3))  # a one-voxel False rim stands for outside
    return bk.ndi.distance_transform_edt(bk.xp.pad(mask, 1), sampling=spacing)[inner] > radius_mm


def _closing(mask, radius_mm: float, spacing, bk: Backend):
    return _erode(_dilate(mask, radius_mm, spacing, bk), radius_mm, spacing, bk) | mask


def _opening(mask, radius_mm: float, spacing, bk: Backend):
    return _dilate(_erode(mask, radius_mm, spacing, bk), radius_mm, spacing, bk) & mask


@dataclass(frozen=True)
class _Coarse:
    """A subsampled grid of about ``voxel_mm`` voxels for the large radii (9-32 mm), where an
    error of one such voxel does not matter and distance transforms cost a fraction."""

    shape: tuple
    strides: tuple
    spacing: tuple

    @classmethod
    def of(cls, shape, spacing, voxel_mm: float):
        strides = tuple(max(1, int(voxel_mm // step)) for step in spacing)
        return cls(
            tuple(shape), strides, tuple(s * t for s, t in zip(spacing, strides, strict=True))
        )

    def down(self, volume, bk: Backend):
        return bk.xp.ascontiguousarray(volume[tuple(slice(None, None, t) for t in self.strides)])

    def up(self, volume, bk: Backend):
        for axis, stride in enumerate(self.strides):
            volume = bk.xp.repeat(volume, stride, axis=axis)
        return volume[tuple(slice(0, n) for n in self.shape)]


def _lung_parts(lung, spacing, config, bk: Backend):
    """Label each lung voxel with its lung: cores left by an erosion that cuts the junction
    lines and bronchial stubs joining the lungs, each voxel owned by its nearest core."""
    xp = bk.xp
    cores, count = bk.ndi.label(_erode(lung, config.lung_split_radius_mm, spacing, bk))
    voxel_ml = float(np.prod(spacing)) / 1000.0
    large = xp.bincount(cores.ravel(), minlength=count + 1) * voxel_ml >= config.min_component_ml
    large[0] = False
    if not bool(large.any()):
        return lung.astype(xp.int32)  # one lung, or too thin to split
    cores = xp.where(large[cores], cores, 0)
    _, nearest = bk.ndi.distance_transform_edt(cores == 0, sampling=spacing, return_indices=True)
    return xp.where(lung, cores[tuple(nearest)], 0).astype(xp.int32)


def _closing_per_lung(mask, owner, radius_mm: float, spacing, bk: Backend):
    """Closing of each lung on its own, so the gap between two lungs is never bridged.

    ``owner`` labels every voxel with the lung of its nearest lung voxel. The dilation is split
    between lungs by owner, and the seams between owners erode like background, so only a
    lung's own concavities fill.
    """
    owner = bk.xp.where(_dilate(mask, radius_mm, spacing, bk), owner, 0)
    barrier = owner == 0
    for axis in range(3):
        seam = _differs_from_next(owner, axis, bk.xp)
        barrier[_shifted(axis, 0)] |= seam
        barrier[_shifted(axis, 1)] |= seam
    return _erode(~barrier, radius_mm, spacing, bk) | mask


def _differs_from_next(owner, axis: int, xp):
    a, b = owner[_shifted(axis, 0)], owner[_shifted(axis, 1)]
    return (a != b) & (a > 0) & (b > 0)


def _shifted(axis: int, start: int):
    """Index of all voxels but the last (start=0) or first (start=1) along ``axis``."""
    index = [slice(None)] * 3
    index[axis] = slice(start, None if start else -1)
    return tuple(index)


def _thin_holes_in_slice(mask, spacing, config, bk: Backend):
    """Holes of an axial slice that one lung encloses and that are thin (vessels, airway walls,
    small nodules): no disc of ``hole_max_radius_mm`` fits in them. Thick holes are lesions or,
    at the lung bases, the top of a diaphragm dome cut across."""
    holes = _enclosed(~mask, bk, in_slice=True)
    if not bool(holes.any()):
        return holes
    labels, count = bk.ndi.label(holes, structure=_SLICE_FACES)
    keep = _bordered_by_one_lung(labels, count, mask, bk)
    radius = config.hole_max_radius_mm
    in_plane = (radius + 1.0, spacing[1], spacing[2])  # slices further apart than the radius
    keep[labels[_erode(holes, radius, in_plane, bk)]] = False
    keep[0] = False
    return keep[labels]


def _bordered_by_one_lung(hole_labels, n_holes, mask, bk: Backend):
    """Per hole label: it touches a single component of ``mask`` in its slice (holes that two
    lungs enclose together are the mediastinum)."""
    xp = bk.xp
    part_labels, n_parts = bk.ndi.label(mask, structure=_SLICE_FULL)
    pairs = []
    for axis in (1, 2):
        for a, b in ((0, 1), (1, 0)):
            h, p = hole_labels[_shifted(axis, a)], part_labels[_shifted(axis, b)]
            touch = (h > 0) & (p > 0)
            pairs.append(h[touch].astype(xp.int64) * (n_parts + 1) + p[touch])
    pairs = xp.unique(xp.concatenate(pairs))
    return xp.bincount(pairs // (n_parts + 1), minlength=n_holes + 1) == 1


# --- the two masks ----------------------------------------------------------------------------


def _conservative(hu, lung, airway, spacing, config, bk: Backend):
    """Paper 2.1: threshold mask closed, then opened; thin holes (vessels) filled per slice."""
    mask = _closing(lung, config.closing_radius_mm, spacing, bk)
    mask = _opening(mask, config.opening_radius_mm, spacing, bk) & ~airway
    holes = _thin_holes_in_slice(mask, spacing, config, bk)
    return mask | (holes & (hu < config.soft_tissue_max_hu))


def _refined(hu, lung, airway, spacing, config, bk: Backend):
    """Paper 2.1: markers -> watershed (Fig. 2b) -> top-hat (Fig. 2c) -> holes closed (2d)."""
    coarse = _Coarse.of(hu.shape, spacing, config.coarse_voxel_mm)
    lung_c = coarse.down(lung, bk)
    distance, nearest = bk.ndi.distance_transform_edt(
        ~lung_c, sampling=coarse.spacing, return_indices=True
    )
    owner = _lung_parts(lung_c, coarse.spacing, config, bk)[tuple(nearest)]
    distance = coarse.up(distance, bk)  # mm to the nearest internal marker
    # Whatever is added to the threshold mask is soft tissue or fluid, never bone.
    soft = hu < config.soft_tissue_max_hu
    step = max(coarse.spacing)
    grown = _watershed_lung(hu, lung, airway, distance, spacing, step, config, bk) & (lung | soft)
    grown_c = coarse.down(grown, bk)
    closed = _closing_per_lung(grown_c, owner, config.tophat_radius_mm, coarse.spacing, bk)
    closed = coarse.up(closed, bk)
    # The black top-hat (closing minus mask) is added within the external markers' extent.
    tophat = closed & ~grown & soft & (distance <= config.external_marker_radius_mm)
    mask = (grown | tophat) & ~airway
    # Closing the remaining holes (Fig. 2d): thin ones per slice, and all that lung encloses
    # in 3-D (lesions), but not the dome tops that a slice shows ringed by lung.
    holes = _thin_holes_in_slice(mask, spacing, config, bk) | _enclosed(~mask, bk, in_slice=False)
    return mask | (holes & soft & ~airway)


def _watershed_lung(hu, lung, airway, distance, spacing, step_mm, config, bk: Backend):
    """Lung voxels of the watershed: internal markers against the ring beyond the intermediate
    markers, flooded within the intermediate-marker radius on a Sobel edge map.

    ``distance`` (mm to the markers) changes by at most ``step_mm`` between neighbours.
    """
    xp = bk.xp
    inner = config.intermediate_marker_radius_mm
    markers = xp.zeros(hu.shape, dtype=xp.int32)
    markers[(distance > inner) | airway] = _BACKGROUND
    markers[lung] = _LUNG
    # The ring needs only its first voxel layer: labels reach the band through it alone.
    region = distance <= inner + step_mm
    labels = watershed(
        _sobel_magnitude(hu, spacing, bk),
        markers,
        region,
        levels=config.watershed_levels,
        connectivity=config.watershed_connectivity,
        backend=bk,
    )
    return labels == _LUNG


def _sobel_magnitude(hu, spacing, bk: Backend):
    """Gradient magnitude in HU/mm from 3-D Sobel derivatives (each axis over its spacing)."""
    xp = bk.xp
    volume = hu.astype(xp.float32)
    total = xp.zeros(hu.shape, dtype=xp.float32)
    for axis, step in enumerate(spacing):
        total += (bk.ndi.sobel(volume, axis=axis) / xp.float32(step)) ** 2
    return xp.sqrt(total)


_METHODS = {"conservative": _conservative, "refined": _refined}
