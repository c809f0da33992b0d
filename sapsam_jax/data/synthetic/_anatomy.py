"""A randomised chest phantom: body wall, ribs, spine, mediastinum, heart, lungs, vessels, airways.

Everything is an implicit shape in patient millimetres (``_grid``), so the same patient renders at
the cohort's reduced grid or at the paper's 432x512x512 (paper 1.1, 2.3). Random per-patient sizes
and smooth shape fields keep the cohort from being one template. HU values are the textbook ones
the paper's three bands separate (paper 2.2): air -1000, lung about -850, fat about -100, soft
tissue and muscle about 40, bone several hundred.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._grid import DEFAULT_FOV_MM, Grid, SmoothField, blend, segment_distance, tube_fraction

# Tissue codes of the anatomy map (tests and lesion placement use them; not written to disk).
OUTSIDE, FAT, MUSCLE, BONE, LUNG, AIRWAY, SOFT, VESSEL = range(8)

HU_AIR = -1000.0
HU_FAT = -100.0
HU_MUSCLE = 45.0
HU_SOFT = 35.0  # mediastinum, heart, liver: unenhanced soft tissue
HU_BLOOD = 40.0  # pulmonary vessels (paper 2.2 soft-tissue band)
HU_LUNG = -845.0  # aerated parenchyma at full inspiration (paper 1.1)
HU_CANCELLOUS = 420.0
HU_CORTICAL = 900.0
HU_RIB = 650.0

BODY_EXPONENT = 2.4  # superellipse: a chest is flatter than an ellipse, front and back


@dataclass
class AnatomyParams:
    """Sizes (mm) and shape fields of one patient; drawn by :func:`sample_anatomy`."""

    body_half: tuple[float, float]  # (x, y) half-axes of the skin outline
    body_cy: float
    fat_mm: float
    muscle_mm: float
    rib_mm: float
    apex_z: float  # lung apices
    base_z: float  # lowest point of the costophrenic recesses
    dome_mm: tuple[float, float]  # diaphragm dome height (right, left): the right one is higher
    lung_cx: tuple[float, float]  # (right, left) lung ellipse centres; right lung at low x
    lung_ax: tuple[float, float]
    lung_cy: float
    mediastinum_half: float
    heart_center: tuple[float, float, float]
    heart_radii: tuple[float, float, float]
    aorta: tuple[float, float, float]  # x, y, radius (descending aorta)
    spine_y: float
    spine_r: float
    rib_pitch: float
    rib_slope: float
    rib_phase: float
    trachea: tuple[float, float]  # y, radius
    carina_z: float
    hilum: tuple[float, float]  # z, y
    fields: dict[str, SmoothField] = field(default_factory=dict)

    @property
    def cavity_inset(self) -> float:
        """Skin-to-pleura depth: fat, muscle, ribs and a 2 mm pleural/intercostal layer."""
        return self.fat_mm + self.muscle_mm + self.rib_mm + 2.0

    @property
    def lung_height(self) -> float:
        return self.apex_z - self.base_z


@dataclass
class Anatomy:
    """A rendered patient: float32 HU, tissue codes and the lung mask (lungs incl. vessels)."""

    grid: Grid
    params: AnatomyParams
    hu: np.ndarray
    tissue: np.ndarray
    lung: np.ndarray


def sample_anatomy(rng: np.random.Generator, grid: Grid) -> AnatomyParams:
    """Random but plausible adult chest sizes, scaled down if the field of view is small."""
    fov = grid.fov_mm
    s_xy = min(1.0, fov[1] / DEFAULT_FOV_MM[1], fov[2] / DEFAULT_FOV_MM[2])
    a, b = rng.uniform(148, 165) * s_xy, rng.uniform(105, 120) * s_xy
    fat, muscle, rib = rng.uniform(6, 20) * s_xy, rng.uniform(8, 13) * s_xy, rng.uniform(8, 11)
    inset = fat + muscle + rib + 2.0
    ac, bc = a - inset, b - inset
    # Lungs fill most of the field of view in z; a short gap above the apices keeps the trachea
    # above the lungs short, so any lung bounding box (with or without airways) agrees.
    z_fov = min(fov[0], DEFAULT_FOV_MM[0])
    top_gap = rng.uniform(8, 14) + 0.3 * (fov[0] - z_fov)
    apex = fov[0] / 2 - top_gap
    height = rng.uniform(0.80, 0.87) * z_fov
    base = apex - height
    dome = (rng.uniform(45, 58) * height / 235, rng.uniform(35, 48) * height / 235)
    spine_r = rng.uniform(15, 19) * s_xy
    spine_y = bc - 0.6 * spine_r
    heart_r = (rng.uniform(45, 55), rng.uniform(40, 50) * s_xy, rng.uniform(50, 60) * s_xy)
    heart = (
        base + dome[1] + 0.75 * heart_r[0],
        -0.25 * bc + rng.uniform(-5, 5),
        rng.uniform(15, 28),
    )
    trachea_r = rng.uniform(7.5, 9.5) * s_xy
    trachea_y = spine_y - spine_r - rng.uniform(10, 16) * s_xy - trachea_r
    carina = apex - rng.uniform(0.28, 0.34) * height
    return AnatomyParams(
        body_half=(a, b),
        body_cy=rng.uniform(-4, 4),
        fat_mm=fat,
        muscle_mm=muscle,
        rib_mm=rib,
        apex_z=apex,
        base_z=base,
        dome_mm=dome,
        lung_cx=(-0.48 * ac, 0.50 * ac),
        lung_ax=(0.60 * ac * rng.uniform(0.97, 1.03), 0.56 * ac * rng.uniform(0.97, 1.03)),
        lung_cy=0.05 * bc,
        mediastinum_half=rng.uniform(14, 19) * s_xy,
        heart_center=heart,
        heart_radii=heart_r,
        aorta=(rng.uniform(14, 20) * s_xy, spine_y - spine_r * 0.4, rng.uniform(10, 12.5) * s_xy),
        spine_y=spine_y,
        spine_r=spine_r,
        rib_pitch=rng.uniform(24, 30),
        rib_slope=rng.uniform(15, 30),
        rib_phase=rng.uniform(0, 30),
        trachea=(trachea_y, trachea_r),
        carina_z=carina,
        hilum=(carina - rng.uniform(15, 25), rng.uniform(-8, 8)),
        fields={
            "body": SmoothField(rng, (150, 400), 4),
            "lung": SmoothField(rng, (60, 180), 6),
            "texture": SmoothField(rng, (15, 40), 8),
            "fat": SmoothField(rng, (60, 200), 4),
        },
    )


# ----------------------------------------------------------------------------- body and bones


def _put(hu, tissue, mask, value, code) -> None:
    """hu[mask] = value, tissue[mask] = code, broadcasting 2-D masks and fields over the slab."""
    np.copyto(hu, np.asarray(value, np.float32), where=mask)
    np.copyto(tissue, np.uint8(code), where=mask)


def _superellipse(x, y, half_x, half_y):
    """<= 1 inside a chest-shaped outline with the given half-axes."""
    p = BODY_EXPONENT
    return (np.abs(x) / half_x) ** p + (np.abs(y) / half_y) ** p


def _body_layers(p: AnatomyParams, z, y, x, texture, hu, tissue):
    """Skin outline, subcutaneous fat, muscle, the rib ring; returns the thoracic-cavity mask."""
    a, b = p.body_half
    wobble = 1.0 + 0.03 * p.fields["body"](z, 0.0, 0.0)  # body size varies along z
    yy = y - np.float32(p.body_cy)
    # Fat thickness varies around the body: a smooth field moves the fat/muscle boundary.
    fat_slack = 0.08 * p.fields["fat"](z, y, x)

    # The rib cage narrows toward the thoracic inlet while shoulder muscles fill the gap.
    rise = np.clip((z - (p.base_z + 0.35 * p.lung_height)) / (0.65 * p.lung_height), 0.0, 1.0)
    taper = 1.0 - 0.16 * rise**1.3

    def inside(depth, slack=0.0, narrow=False):
        scale = wobble * taper if narrow else wobble
        return _superellipse(x, yy, (a - depth) * scale, (b - depth) * scale) <= 1.0 + slack

    body = inside(0.0)
    _put(hu, tissue, body, HU_FAT + 15 * texture, FAT)
    _put(hu, tissue, inside(p.fat_mm, fat_slack), HU_MUSCLE, MUSCLE)
    depth = p.fat_mm + p.muscle_mm
    ring = inside(depth, narrow=True) & ~inside(depth + p.rib_mm, narrow=True)
    cavity = inside(depth + p.rib_mm + 2.0, narrow=True)
    _ribs(p, z, y, x, ring, hu, tissue)
    _put(hu, tissue, cavity, HU_SOFT, SOFT)
    return cavity


def _ribs(p: AnatomyParams, z, y, x, ring, hu, tissue):
    """Oblique rib bands in the ring: each rib runs down from the spine toward the sternum."""
    b = p.body_half[1]
    level = (z + p.rib_slope * (y / b) + p.rib_phase) / p.rib_pitch
    in_rib = (level % 1.0) < 0.36
    in_rib &= (z < p.apex_z + 0.3 * p.rib_pitch) & (z > p.base_z - 2 * p.rib_pitch)
    sternum = (np.abs(x) < 18) & (y < 0)
    cartilage = (np.abs(x) < 45) & (y < -0.6 * b) & ~sternum  # costal cartilage: soft tissue
    bone = ring & ((in_rib & ~cartilage) | (sternum & (y < -0.5 * b)))
    _put(hu, tissue, bone, HU_RIB, BONE)


def _spine(p: AnatomyParams, z, y, x, hu, tissue):
    """Vertebral body (cancellous core, cortical rim, discs), canal and posterior elements."""
    r = np.sqrt(x * x + (y - p.spine_y) ** 2)
    body = r <= p.spine_r
    disc = ((z - p.rib_phase) / p.rib_pitch % 1.0) < 0.15
    _put(hu, tissue, body, np.where(r > p.spine_r - 2.5, HU_CORTICAL, HU_CANCELLOUS), BONE)
    _put(hu, tissue, body & disc, 90.0, SOFT)
    canal_y = p.spine_y + p.spine_r + 8.0
    rc = np.sqrt(x * x + (y - canal_y) ** 2)
    arch = ((rc > 7.0) & (rc < 12.0)) | ((np.abs(x) < 4.0) & (y > canal_y) & (y < canal_y + 28))
    arch &= _superellipse(x, y - p.body_cy, p.body_half[0] - 8, p.body_half[1] - 8) <= 1.0
    _put(hu, tissue, arch, HU_CORTICAL * 0.8, BONE)
    canal = rc <= 7.0
    _put(hu, tissue, canal, 15.0, SOFT)


# ----------------------------------------------------------------------------- lungs


def _lung_side(p: AnatomyParams, side: int, z, y, x, shape_field, cavity):
    """One lung (side 0 = right, at low x; 1 = left): an ellipse in each slice that narrows to
    the apex, above a domed diaphragm, clipped by the rib cage, mediastinum and heart."""
    cx, ax = p.lung_cx[side], p.lung_ax[side]
    ay = p.body_half[1] - p.cavity_inset
    u, v = (x - cx) / ax, (y - p.lung_cy) / ay
    q = u * u + v * v + 0.07 * shape_field
    # Cross-sections shrink toward the apex (a rounded cone), fastest in the top third.
    t = np.clip((z - p.base_z) / p.lung_height, 0.0, None)
    inside = (q <= 1.0 - np.minimum(t, 1.0) ** 1.8) & (t <= 1.0)
    dome = p.dome_mm[side] * np.clip(1.0 - (u * u / 0.7 + v * v / 0.8), 0.0, 1.0) ** 0.7
    inside &= z >= p.base_z + dome
    medial = x < -p.mediastinum_half if side == 0 else x > p.mediastinum_half
    return inside & medial & cavity


def _mediastinum(p: AnatomyParams, z, y, x):
    """Central soft tissue the lungs wrap around: mediastinal band, heart, aorta, spine."""
    hz, hy, hx = p.heart_center
    rz, ry, rx = p.heart_radii
    heart = ((z - hz) / rz) ** 2 + ((y - hy) / ry) ** 2 + ((x - hx) / rx) ** 2 <= 1.0
    band = (np.abs(x) <= p.mediastinum_half) & (y < p.spine_y)
    ax_, ay_, ar = p.aorta
    aorta = ((x - ax_) ** 2 + (y - ay_) ** 2 <= ar * ar) & (z < p.carina_z + 15)
    spine_zone = (np.abs(x) < p.spine_r + 8) & (y > p.spine_y - p.spine_r - 4)
    return heart | band | aorta | spine_zone


def _render_chunk(p: AnatomyParams, grid: Grid, box, hu, tissue, lung):
    z, y, x = grid.coords(box)
    hu_c = np.full(hu[box].shape, HU_AIR, np.float32)
    tis_c = np.zeros(hu_c.shape, np.uint8)
    texture, shape_field = p.fields["texture"](z, y, x), p.fields["lung"](z, y, x)
    cavity = _body_layers(p, z, y, x, texture, hu_c, tis_c)
    _spine(p, z, y, x, hu_c, tis_c)
    central = _mediastinum(p, z, y, x)
    lungs = _lung_side(p, 0, z, y, x, shape_field, cavity)
    lungs |= _lung_side(p, 1, z, y, x, shape_field, cavity)
    lungs &= ~central
    ay = p.body_half[1] - p.cavity_inset
    # Dependent (posterior) lung is a little denser in a supine patient.
    gradient = 25.0 * np.clip((y - p.lung_cy) / ay, -1, 1) + 12.0 * texture
    _put(hu_c, tis_c, lungs, HU_LUNG + gradient, LUNG)
    hu[box], tissue[box], lung[box] = hu_c, tis_c, np.broadcast_to(lungs, hu_c.shape)


def render_anatomy(params: AnatomyParams, grid: Grid, rng: np.random.Generator) -> Anatomy:
    """Render ``params`` on ``grid`` (k-slab by k-slab), then paint vessels and airways."""
    hu = np.empty(grid.shape, np.float32)
    tissue = np.empty(grid.shape, np.uint8)
    lung = np.empty(grid.shape, bool)
    for box in grid.chunks():
        _render_chunk(params, grid, box, hu, tissue, lung)
    anatomy = Anatomy(grid, params, hu, tissue, lung)
    points = _lung_points(anatomy, rng)
    segments = [_vessel_tree(rng, anatomy, points[side], side) for side in (0, 1)]
    for segs in segments:
        _paint_vessels(anatomy, segs)
    _paint_airways(anatomy, segments, rng)
    return anatomy


# ----------------------------------------------------------------------------- vessels, airways


def _lung_points(anatomy: Anatomy, rng, n: int = 3000) -> list[np.ndarray]:
    """Random lung points (mm) of each side (right, left), to steer the vessel trees."""
    flat = np.flatnonzero(anatomy.lung)
    pick = rng.choice(flat, size=min(2 * n, flat.size), replace=False)  # random order
    idx = np.stack(np.unravel_index(pick, anatomy.grid.shape), axis=1).astype(float)
    points = anatomy.grid.to_mm(idx + rng.uniform(-0.5, 0.5, size=idx.shape))
    return [points[points[:, 2] < 0][:n], points[points[:, 2] > 0][:n]]


def _vessel_tree(rng, anatomy: Anatomy, points, side: int, depth: int = 7, r0: float = 5.5):
    """Pulmonary vessel tree: (start, end, radius, generation) segments from the hilum.

    Each node splits its share of lung points in two across their principal axis and sends a
    branch toward each half, so branches fill the lung and thin out toward the periphery.
    """
    p = anatomy.params
    sign = -1.0 if side == 0 else 1.0
    hilum = np.array([p.hilum[0], p.hilum[1], sign * (p.mediastinum_half + 6.0)])
    segments, stack = [], [(hilum, points, 0)]
    while stack:
        node, pts, gen = stack.pop()
        if gen >= depth or len(pts) < 8:
            continue
        centred = pts - pts.mean(0)
        principal = np.linalg.eigh(centred.T @ centred)[1][:, -1]
        normal = principal + 0.3 * rng.normal(size=3)
        above = centred @ normal > 0
        for group in (pts[above], pts[~above]):
            if len(group) < 4:
                continue
            end = node + 0.75 * (group.mean(0) - node)
            segments.append((node, end, r0 * 0.72**gen, gen))
            stack.append((end, group, gen + 1))
    return segments


def _paint_vessels(anatomy: Anatomy, segments) -> None:
    """Blood-density tubes (about +40 HU, paper 2.2 soft-tissue band) inside the lungs only."""
    grid, edge = anatomy.grid, anatomy.grid.voxel_mm
    for a, b, r, _ in segments:
        box = grid.box(np.minimum(a, b) - r - edge, np.maximum(a, b) + r + edge)
        if box is None:
            continue
        frac = tube_fraction(segment_distance(*grid.coords(box), a, b), r, edge)
        frac *= anatomy.lung[box]
        blend(anatomy.hu, box, frac, HU_BLOOD)
        vessel = frac > 0.5
        anatomy.tissue[box][vessel] = VESSEL


def _paint_airway(anatomy: Anatomy, a, b, lumen: float, wall: float, in_lung_only: bool) -> None:
    """An air-filled tube with a soft-tissue wall."""
    grid, edge = anatomy.grid, anatomy.grid.voxel_mm
    outer = lumen + wall
    box = grid.box(np.minimum(a, b) - outer - edge, np.maximum(a, b) + outer + edge)
    if box is None:
        return
    dist = segment_distance(*grid.coords(box), a, b)
    keep = anatomy.lung[box] if in_lung_only else np.float32(1.0)
    blend(anatomy.hu, box, tube_fraction(dist, outer, edge) * keep, HU_SOFT)
    air = tube_fraction(dist, lumen, edge) * keep
    blend(anatomy.hu, box, air, HU_AIR)
    anatomy.tissue[box][air > 0.5] = AIRWAY


def _paint_airways(anatomy: Anatomy, trees, rng) -> None:
    """Trachea from the top of the scan to the carina, main bronchi to the hila, and bronchi
    running beside the first vessel generations (bronchovascular bundles)."""
    p, grid = anatomy.params, anatomy.grid
    y_t, r_t = p.trachea
    top = grid.fov_mm[0] / 2 + 10.0
    carina = np.array([p.carina_z, y_t, 0.0])
    _paint_airway(anatomy, carina, np.array([top, y_t, 0.0]), r_t, 2.0, False)
    for segments in trees:
        if not segments:
            continue
        hilum = segments[0][0]
        _paint_airway(anatomy, carina, hilum, 0.7 * r_t, 1.5, False)
        for a, b, r, gen in segments:
            if gen > 3:
                continue
            d = (b - a) / (np.linalg.norm(b - a) + 1e-6)
            off = np.cross(d, rng.normal(size=3))
            off /= np.linalg.norm(off) + 1e-6
            lumen = max(0.9 * r, 1.0)
            shift = off * (r + lumen + 1.5)
            _paint_airway(anatomy, a + shift, b + shift, lumen, max(0.8, 0.25 * lumen), True)
