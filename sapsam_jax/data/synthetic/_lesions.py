"""CPA signs and pre-existing lung conditions: where they go (sub-regions, Table 1) and how they
look on CT (paper 1.1-1.2, Fig. 3).

Signs (paper 1.1): a cavity is an air-filled ball with a 2-4 mm soft-tissue wall; a fungus ball
is a soft-tissue ball lying in the dependent part of a cavity with an air crescent above it; pleural
thickening is a soft-tissue layer along the costal or apical pleura with fibrotic lung beneath.
Confounders (paper 1.1, pre-existing conditions): emphysema (-950 HU patches), consolidation (a
soft-tissue patch with air bronchograms) and bronchiectasis (dilated thick-walled airways).

Every lesion lies well inside one sub-region of the lung bounding box (paper 1.2: i halves, k
thirds; docs/ARCHITECTURE.md), so each annotation flag is unambiguous.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from ...config import ANNOTATION_FLAGS, SUBREGIONS
from ._anatomy import AIRWAY, HU_AIR, HU_SOFT, LUNG, VESSEL, Anatomy
from ._grid import Grid, SmoothField, blend, segment_distance, soft_inside, tube_fraction

# Label values of the ground-truth maps (docs/ARCHITECTURE.md, manifest ``lesion_labels``).
LABELS = {"cavity": 1, "fungus_ball": 2, "pleural_thickening": 3, "preexisting": 4}
CONFOUNDERS = ("emphysema", "consolidation", "bronchiectasis")

# Paper Table 1: studies (of N=276 CPA studies) with each sign per sub-region.
TABLE1_COUNTS = {
    "cavity": {"upper": (172, 121), "middle": (33, 15), "lower": (5, 15)},
    "pleural_thickening": {"upper": (169, 143), "middle": (12, 8), "lower": (8, 3)},
    "fungus_ball": {"upper": (119, 143), "middle": (14, 10), "lower": (3, 9)},
}
TABLE1_STUDIES = 276
# Paper 1.1: pre-existing conditions among the 276 CPA studies (non-exclusive).
CONFOUNDER_RATES = {"consolidation": 112 / 276, "bronchiectasis": 86 / 276, "emphysema": 66 / 276}
# Where each confounder tends to sit (upper, middle, lower): emphysema is upper-lobe dominant.
CONFOUNDER_LEVELS = {
    "emphysema": (0.6, 0.3, 0.1),
    "consolidation": (0.35, 0.35, 0.3),
    "bronchiectasis": (0.2, 0.4, 0.4),
}
LEVELS = ("upper", "middle", "lower")

HU_WALL = 30.0  # cavity wall, fungus ball, pleura: soft tissue (paper 2.2 band [-160, 240])
HU_EMPHYSEMA = -950.0
HU_GROUND_GLASS = -350.0
HU_FIBROSIS = -600.0  # fibrotic lung under the pleura: denser, still below -570 (paper 2.1)
# Sign rates (Table 1) are per study; the first scans of a patient carry smaller, fewer signs.
P_FUNGUS_GIVEN_CAVITY_MAX = 0.8
CAVITY_BUMP = 0.08  # irregularity of a cavity's outline, fraction of its radius
# Smallest cavity the grid must show from the first scan that has it: an air lumen of at least
# 1.5 voxels (and 4 mm) radius, and a fungus ball of at least 2 voxels (and 6 mm) radius. Coarse
# grids (the quick preset's 3.6 mm) otherwise drew first-scan cavities of one or two air voxels
# and fungus balls of a few voxels, signs nobody could label at that resolution; aspergillomas
# are 2-4 cm across (paper 1.1), cavities at least about a centimetre.
MIN_LUMEN = (1.5, 4.0)  # (voxels, mm)
MIN_FUNGUS_BALL = (2.0, 6.0)  # (voxels, mm)
OUTLINE_BUMP = 0.25  # irregularity of emphysema and consolidation patches


def table1_rates() -> dict[str, dict[str, float]]:
    """Per sub-region probability of each sign in a CPA study (Table 1 counts / 276)."""
    rates = {}
    for sign, levels in TABLE1_COUNTS.items():
        rates[sign] = {}
        for level, (left, right) in levels.items():
            rates[sign][f"left_{level}"] = left / TABLE1_STUDIES
            rates[sign][f"right_{level}"] = right / TABLE1_STUDIES
    return rates


@dataclass
class Lesion:
    """One sign or confounder, planned in the patient frame (mm) at its final (largest) size."""

    kind: str  # cavity | pleural_thickening | emphysema | consolidation | bronchiectasis
    region: str  # sub-region name (config.SUBREGIONS)
    center: np.ndarray  # (z, y, x) mm
    size: float  # final radius (cavity: outer; pleural thickening: patch radius), mm
    onset: int = 0  # index of the first scan that shows it
    first_scale: float = 1.0  # size factor at onset; grows linearly to 1 at the last scan
    seed: int = 0  # shape and texture seed, fixed so the lesion is the same in every scan
    params: dict = field(default_factory=dict)

    @property
    def is_sign(self) -> bool:
        return self.kind in ("cavity", "pleural_thickening")

    def scale(self, scan: int, n_scans: int) -> float:
        """Size factor at ``scan`` (0 before onset): signs persist or progress (paper 1.1)."""
        if scan < self.onset:
            return 0.0
        if n_scans - 1 <= self.onset:
            return 1.0
        progress = (scan - self.onset) / (n_scans - 1 - self.onset)
        return self.first_scale + (1.0 - self.first_scale) * progress


# ----------------------------------------------------------------------------- sub-regions


@dataclass(frozen=True)
class LungBox:
    """The lungs' bounding box (mm, voxel edges) and its six sub-regions (paper 1.2, 2.3)."""

    lo: np.ndarray
    hi: np.ndarray

    @classmethod
    def from_mask(cls, mask: np.ndarray, grid: Grid) -> LungBox:
        idx = [
            np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)
        ]
        half = np.asarray(grid.spacing) / 2
        lo = grid.to_mm([i[0] for i in idx]) - half
        hi = grid.to_mm([i[-1] for i in idx]) + half
        return cls(lo, hi)

    @property
    def height(self) -> float:
        return float(self.hi[0] - self.lo[0])

    @property
    def x_mid(self) -> float:
        return float(self.lo[2] + self.hi[2]) / 2

    def z_range(self, level: str) -> tuple[float, float]:
        """k thirds of the box: the highest third is upper (k toward Superior)."""
        n = {"lower": 0, "middle": 1, "upper": 2}[level]
        third = self.height / 3
        return float(self.lo[0] + n * third), float(self.lo[0] + (n + 1) * third)

    def region_of(self, z, x) -> np.ndarray:
        """Sub-region index (into config.SUBREGIONS) of points; high x (i) is the patient's left."""
        level = np.clip(((np.asarray(z) - self.lo[0]) / (self.height / 3)).astype(int), 0, 2)
        left = np.asarray(x) >= self.x_mid
        # SUBREGIONS order: left upper/middle/lower, then right upper/middle/lower.
        return np.where(left, 0, 3) + (2 - level)


def split_region(region: str) -> tuple[str, str]:
    side, level = region.split("_")
    return side, level


# ----------------------------------------------------------------------------- placement


class Planner:
    """Finds lesion sites inside one sub-region, away from its borders and from other lesions.

    Works on a planning copy of the lung mask at about 4.5 mm (site choice needs no more; the
    painting is done on the full grid), with the in-lung distance to the pleura and the direction
    of the nearest pleura.
    """

    PLANNING_MM = 4.5

    GAP_MM = 3.0  # clearance between lesions, so labels never overlap

    def __init__(self, anatomy: Anatomy, rng: np.random.Generator):
        grid = anatomy.grid
        self.rng, self.grid, self.params = rng, grid, anatomy.params
        self.box = LungBox.from_mask(anatomy.lung, grid)
        step = np.maximum(1, np.round(self.PLANNING_MM / np.asarray(grid.spacing))).astype(int)
        mask = anatomy.lung[:: step[0], :: step[1], :: step[2]]
        sampling = np.asarray(grid.spacing) * step
        dist, nearest = ndi.distance_transform_edt(mask, sampling=sampling, return_indices=True)
        idx = np.argwhere(mask)
        self.points = grid.to_mm(idx * step)
        self.depth = dist[mask]
        outward = (nearest[:, mask].T - idx) * sampling
        self.outward = outward / (np.linalg.norm(outward, axis=1, keepdims=True) + 1e-6)
        self.step_mm = float(sampling.max())
        # Margin from sub-region borders: covers a mask-dependent box (airways, bounding-box margin
        # in preprocessing, +-1 voxel) so that a lesion's sub-region is never in doubt.
        self.margin = max(1.5 * max(grid.spacing), 0.06 * self.box.height)
        self.taken: list[tuple[np.ndarray, float]] = []

    def _in_region(self, region: str, extent: float) -> np.ndarray:
        side, level = split_region(region)
        z0, z1 = self.box.z_range(level)
        z, x = self.points[:, 0], self.points[:, 2]
        # The box's own top and bottom are the lungs' apex and base: no neighbour there, and a
        # lesion (inside the lung) cannot cross them.
        lo = z0 + self.margin + extent if level != "lower" else z0
        hi = z1 - self.margin - extent if level != "upper" else z1
        ok = (z >= lo) & (z <= hi)
        sign = 1.0 if side == "left" else -1.0
        return ok & (sign * (x - self.box.x_mid) >= self.margin + extent)

    def _free(self, extent: float) -> np.ndarray:
        ok = np.ones(len(self.points), bool)
        for center, radius in self.taken:
            gap = np.linalg.norm(self.points - center, axis=1)
            ok &= gap >= extent + radius + self.GAP_MM
        return ok

    def _pick(self, candidates: np.ndarray, occupy: float) -> np.ndarray | None:
        """A random candidate at least ``occupy`` mm (+ gap) from the lesions placed so far."""
        idx = np.flatnonzero(candidates & self._free(occupy))
        if idx.size == 0:
            return None
        center = self.points[self.rng.choice(idx)].copy()
        self.taken.append((center, occupy))
        return center

    def interior(self, region: str, extent: float, clearance: float) -> np.ndarray | None:
        """A site whose ball of radius ``extent`` stays in the region, ``clearance`` mm (or more)
        from the pleura measured from its centre."""
        return self._pick(self._in_region(region, extent) & (self.depth >= clearance), extent)

    def pleural(self, region: str, extent: float) -> np.ndarray | None:
        """A lung border site on the costal (lateral/posterior) or apical pleura, not on the
        mediastinum or diaphragm, where pleural thickening sits in CPA (paper 1.1)."""
        side, _ = split_region(region)
        sign = 1.0 if side == "left" else -1.0
        o = self.outward
        costal = (sign * o[:, 2] > 0.5) | (o[:, 1] > 0.6) | (o[:, 0] > 0.5)
        border = (self.depth <= 1.5 * self.step_mm) & costal & (o[:, 0] > -0.4)
        border &= self._in_region(region, extent)
        # Prefer the sloping costal pleura (also around the apex) to the flat top of the dome:
        # a cap seen end-on adds little to an axial projection.
        sloped = border & (o[:, 0] < 0.7)
        # It hugs the pleura, so it may share its ball with an inner lesion (cavities are painted
        # over it: fibrosis around a cavity is the usual CPA picture).
        return self._pick(sloped if sloped.any() else border, 0.4 * extent)


def _sample_sign_regions(rng: np.random.Generator) -> list[tuple[str, str]]:
    """(sign, region) pairs of a CPA patient at Table 1 rates; a fungus ball implies a cavity."""
    rates = table1_rates()
    found = []
    for region in SUBREGIONS:
        fungus = rates["fungus_ball"][region]
        cavity = max(rates["cavity"][region], fungus / P_FUNGUS_GIVEN_CAVITY_MAX)
        if rng.random() < cavity:
            found.append(("cavity", region))
            if rng.random() < fungus / cavity:
                found.append(("fungus_ball", region))
        if rng.random() < rates["pleural_thickening"][region]:
            found.append(("pleural_thickening", region))
    if not any(s != "fungus_ball" for s, _ in found):
        # A CPA study always shows at least one sign; Table 1 makes the upper lobes most likely.
        sign = ("cavity", "pleural_thickening")[rng.integers(2)]
        found.append((sign, f"{('left', 'right')[rng.integers(2)]}_upper"))
    return found


def _place_cavity(planner: Planner, rng, region: str, fungus: bool) -> Lesion | None:
    axes = rng.uniform(0.88, 1.12, size=3)
    axes /= np.cbrt(axes.prod())
    wall = rng.uniform(2.0, 4.0)  # paper Fig. 3 / radiology: thin-to-moderate cavity walls
    params = {"wall": wall, "axes": axes, "rotation": _random_rotation(rng)}
    if fungus:
        params["ball_fraction"] = rng.uniform(0.6, 0.85)
    smallest = smallest_visible_radius(params, planner.grid)
    for shrink in (1.0, 0.8, 0.65, 0.5):
        # Cavities holding a fungus ball are the larger, older ones (aspergillomas of 2-4 cm).
        radius = max(rng.uniform(*((16.0, 26.0) if fungus else (12.0, 24.0))) * shrink, smallest)
        extent = radius * axes.max() * (1.0 + CAVITY_BUMP)
        # Clearance from the pleura keeps the wall (and any fungus ball) off the chest wall, so
        # the whole cavity is a hole in the lung mask that hole filling recovers (paper 2.1).
        center = planner.interior(region, extent, extent + 4.0)
        if center is not None:
            break
    else:
        return None
    return Lesion("cavity", region, center, radius, seed=int(rng.integers(2**31)), params=params)


def cavity_visible(params: dict, radius: float, grid: Grid) -> bool:
    """Whether a cavity of outer radius ``radius`` (and its fungus ball, if it has one) is at
    least the smallest size ``grid`` shows (``MIN_LUMEN``, ``MIN_FUNGUS_BALL``)."""
    vox = max(grid.spacing)
    lumen = min(params["axes"]) * ((1.0 - CAVITY_BUMP) * radius - params["wall"])
    if lumen < max(MIN_LUMEN[0] * vox, MIN_LUMEN[1]):
        return False
    if "ball_fraction" not in params:
        return True
    geometry = fungus_ball_geometry(params, radius, grid)
    return geometry is not None and geometry[0] >= max(MIN_FUNGUS_BALL[0] * vox, MIN_FUNGUS_BALL[1])


def smallest_visible_radius(params: dict, grid: Grid) -> float:
    """Smallest outer radius (mm, to 0.1 mm) at which :func:`cavity_visible` holds."""
    lo, hi = 0.0, 200.0  # visibility grows with the radius: bisect
    while hi - lo > 0.1:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if cavity_visible(params, mid, grid) else (mid, hi)
    return hi


def _place_pleural(planner: Planner, rng, region: str) -> Lesion | None:
    for shrink in (1.0, 0.85, 0.7, 0.55):
        radius = rng.uniform(30.0, 50.0) * shrink
        center = planner.pleural(region, radius)
        if center is not None:
            break
    else:
        return None
    vox = max(planner.grid.spacing)
    params = {
        "thickness": max(rng.uniform(6.0, 14.0), 1.2 * vox),
        "fibrosis": rng.uniform(15.0, 25.0),
        "ground_glass": rng.uniform(4.0, 8.0),
    }
    return Lesion(
        "pleural_thickening", region, center, radius, seed=int(rng.integers(2**31)), params=params
    )


CONFOUNDER_RADII = {"emphysema": (14, 28), "consolidation": (10, 20), "bronchiectasis": (14, 22)}
# Fraction of the radius a confounder's centre keeps from the pleura (emphysema and
# consolidation may reach it, bronchiectasis runs inside).
CONFOUNDER_CLEARANCE = {"emphysema": 0.4, "consolidation": 0.6, "bronchiectasis": 0.8}


def confounder_extent(kind: str, radius: float) -> float:
    """Largest distance (mm) of a confounder's labelled voxels from its centre."""
    if kind == "bronchiectasis":
        return 1.1 * radius + 6.0  # tube starts within 0.4 r, half-length <= 0.7 r, lumen + wall
    return radius * (1.0 + OUTLINE_BUMP)


def _place_confounder(planner: Planner, rng, kind: str) -> Lesion | None:
    for _ in range(4):
        level = LEVELS[rng.choice(3, p=CONFOUNDER_LEVELS[kind])]
        region = f"{('left', 'right')[rng.integers(2)]}_{level}"
        radius = rng.uniform(*CONFOUNDER_RADII[kind])
        extent = confounder_extent(kind, radius)
        center = planner.interior(region, extent, CONFOUNDER_CLEARANCE[kind] * radius)
        if center is not None:
            return Lesion(kind, region, center, radius, seed=int(rng.integers(2**31)))
    return None


def plan_lesions(planner: Planner, rng: np.random.Generator, n_scans: int) -> list[Lesion]:
    """All lesions of a CPA patient with onsets and growth over ``n_scans`` longitudinal scans.

    Signs persist once seen and grow (first scan: 60-90 % of the final size); a fungus ball may
    appear in an existing cavity later. Confounders are pre-existing: present from the first scan.
    """
    lesions = []
    pairs = _sample_sign_regions(rng)
    for sign, region in sorted(pairs, key=lambda p: p[0] != "cavity"):  # cavities first: biggest
        if sign == "cavity":
            lesion = _place_cavity(planner, rng, region, ("fungus_ball", region) in pairs)
        elif sign == "pleural_thickening":
            lesion = _place_pleural(planner, rng, region)
        else:
            continue  # a fungus ball is part of its cavity
        if lesion is not None:
            lesions.append(lesion)
    if not lesions:
        lesions = _fallback_sign(planner, rng)
    for lesion in lesions:
        lesion.onset = 0 if rng.random() < 0.6 else int(rng.integers(0, n_scans))
        lesion.first_scale = rng.uniform(0.6, 0.9)
        if lesion.kind == "cavity":  # the first scan that shows it shows it resolvably
            smallest = smallest_visible_radius(lesion.params, planner.grid)
            lesion.first_scale = max(lesion.first_scale, smallest / lesion.size)
        if "ball_fraction" in lesion.params:
            lesion.params["ball_onset"] = int(rng.integers(lesion.onset, n_scans))
    if lesions and min(lesion.onset for lesion in lesions) > 0:
        lesions[int(rng.integers(len(lesions)))].onset = 0  # the first scan is already CPA
    for kind in CONFOUNDERS:
        if rng.random() < CONFOUNDER_RATES[kind]:
            lesion = _place_confounder(planner, rng, kind)
            if lesion is not None:
                lesions.append(lesion)
    return lesions


def _unit(rng) -> np.ndarray:
    v = rng.normal(size=3)
    return v / (np.linalg.norm(v) + 1e-9)


def _fallback_sign(planner: Planner, rng) -> list[Lesion]:
    """One sign for a CPA patient whose sampled signs found no room (very coarse grids)."""
    for region in rng.permutation(["left_upper", "right_upper", "left_middle", "right_middle"]):
        lesion = _place_pleural(planner, rng, str(region)) or _place_cavity(
            planner, rng, str(region), False
        )
        if lesion is not None:
            return [lesion]
    return []


def _random_rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


# ----------------------------------------------------------------------------- painting


@dataclass
class Canvas:
    """The scan being painted: float32 HU and uint8 labels on the anatomy's grid."""

    anatomy: Anatomy
    hu: np.ndarray
    labels: np.ndarray

    @property
    def grid(self) -> Grid:
        return self.anatomy.grid

    def local(self, center, radius):
        """Box around a ball and its open coordinate grids relative to ``center``."""
        box = self.grid.ball_box(center, radius + 2 * self.grid.voxel_mm)
        z, y, x = self.grid.coords(box)
        c = np.asarray(center, np.float32)
        return box, (z - c[0], y - c[1], x - c[2])


def _ellipsoid_radius(dz, dy, dx, axes, rotation) -> np.ndarray:
    """Normalised radius of an ellipsoid with unit mean radius (1 on its surface)."""
    r = np.asarray(rotation, np.float32)
    acc = None
    for n in range(3):
        along = (r[0, n] * dz + r[1, n] * dy + r[2, n] * dx) / np.float32(axes[n])
        acc = along * along if acc is None else acc + along * along
    return np.sqrt(acc)


def paint_cavity(canvas: Canvas, lesion: Lesion, scale: float, ball: bool) -> None:
    """Air-filled cavity with a 2-4 mm soft-tissue wall (label 1), and optionally a fungus ball
    resting on its dependent (posterior) wall with an air crescent in front (label 2)."""
    p = lesion.params
    radius, wall, edge = lesion.size * scale, p["wall"], canvas.grid.voxel_mm
    shape = SmoothField(np.random.default_rng(lesion.seed), (15, 45), 5)
    box, (dz, dy, dx) = canvas.local(lesion.center, radius * 1.3)
    bump = 1.0 + CAVITY_BUMP * np.clip(shape(dz, dy, dx), -1, 1)
    # Signed distance (mm) to the outer wall surface; the inner surface lies ``wall`` inside it.
    outer = _ellipsoid_radius(dz, dy, dx, p["axes"], p["rotation"]) - radius * bump
    blend(canvas.hu, box, soft_inside(outer, edge), HU_WALL)
    blend(canvas.hu, box, soft_inside(outer + wall, edge), HU_AIR)
    canvas.labels[box][outer < 0] = LABELS["cavity"]
    if ball:
        _paint_fungus_ball(canvas, lesion, radius, box, (dz, dy, dx))


def fungus_ball_geometry(params: dict, radius: float, grid: Grid) -> tuple[float, float] | None:
    """(ball radius, posterior offset) inside a cavity (``Lesion.params``) of outer radius
    ``radius``, or None.

    The ball lies in the dependent part (posterior: the patient is supine) with a gap to the wall
    of about a voxel, so the air crescent anterior to it (the CT hallmark of a fungus ball) is at
    least 1.5 voxels wide and the wall still encloses it on the grid.
    """
    p, vox = params, max(grid.spacing)
    # Smallest inner radius in any direction.
    inner = min(p["axes"]) * ((1.0 - CAVITY_BUMP) * radius - p["wall"])
    gap = max(0.5, vox - p["wall"] * min(p["axes"]) + 0.3)
    ball = min(p["ball_fraction"] * inner, inner - (1.5 * vox + gap) / 2)
    if ball < max(0.6 * vox, 3.0):
        return None
    return ball, inner - ball - gap


def _paint_fungus_ball(canvas: Canvas, lesion: Lesion, radius: float, box, rel) -> None:
    geometry = fungus_ball_geometry(lesion.params, radius, canvas.grid)
    if geometry is None:
        return
    ball, offset = geometry
    dz, dy, dx = rel
    dist = np.sqrt(dz * dz + (dy - np.float32(offset)) ** 2 + dx * dx)
    texture = SmoothField(np.random.default_rng(lesion.seed + 1), (4, 10), 6)(dz, dy, dx)
    # Mottled soft tissue with small air pockets: the sponge-like look of an aspergilloma.
    value = np.where(texture > 0.9, -500.0, 45.0 + 20.0 * texture).astype(np.float32)
    blend(canvas.hu, box, soft_inside(dist - ball, canvas.grid.voxel_mm), value)
    canvas.labels[box][dist < ball] = LABELS["fungus_ball"]


def paint_pleural(canvas: Canvas, lesion: Lesion, scale: float) -> None:
    """Nodular soft-tissue thickening of the pleura over fibrotic lung (label 3)."""
    p, grid = lesion.params, canvas.grid
    reach = lesion.size + p["thickness"] + p["ground_glass"] + p["fibrosis"] + 2 * grid.voxel_mm
    box, (dz, dy, dx) = canvas.local(lesion.center, reach)
    lung = canvas.anatomy.lung[box]
    # Depth below the pleura, from the lung mask of this patch alone (it is wider than the depth).
    depth = ndi.distance_transform_edt(lung, sampling=grid.spacing).astype(np.float32)
    lung = lung & (canvas.labels[box] == 0)  # a new array: leave other lesions as they are
    depth -= 0.5 * grid.voxel_mm
    rng = np.random.default_rng(lesion.seed)
    nodules, strands = (
        SmoothField(rng, (16, 32), 8)(dz, dy, dx),
        SmoothField(rng, (5, 12), 6)(dz, dy, dx),
    )
    r2 = (dz * dz + dy * dy + dx * dx) / np.float32(lesion.size**2)
    weight = np.clip(1.0 - r2 * r2, 0.0, 1.0)  # flat-topped lens
    # Nodular: soft-tissue bumps 1-2 cm wide on a thin pleural layer. CPA thickening is rarely
    # smooth, and bumps narrower than the top-hat radius are what the refined mask takes back
    # from the chest wall (paper 2.1), so they show in the soft-tissue band.
    bumps = 0.25 + 0.75 * np.clip(1.6 * nodules, 0.0, 1.0)
    thick = p["thickness"] * (0.7 + 0.3 * scale) * weight * bumps
    # Beneath the plaque: a ground-glass seam (-350 HU), then fibrotic lung (-600 HU) crossed by
    # reticular strands at -150 HU. Seam and fibrosis light up the lung band (paper 2.2), the
    # strands the floor of the soft-tissue band. The refined mask takes in much of them (a median
    # 0.64 of a patch's labelled voxels on the quick grid) where the plaque, against the chest
    # wall, is cut off with it.
    seam = thick + p["ground_glass"] * weight
    fibrosis = seam + p["fibrosis"] * scale * np.clip(1.0 - r2 / 0.81, 0.0, 1.0)
    edge = grid.voxel_mm
    reticulation = np.where(np.abs(strands) < 0.25, -150.0, HU_FIBROSIS).astype(np.float32)
    # Only under the lens: where its layers are 0 mm thick the ramp of soft_inside would still
    # paint part of every surface voxel of the box (the lung's outermost voxel lies less than
    # half a voxel deep), a faint rim far beyond the patch and into other sub-regions.
    lung = lung & (weight > 0)
    blend(canvas.hu, box, soft_inside(depth - fibrosis, edge) * lung, reticulation)
    blend(canvas.hu, box, soft_inside(depth - seam, edge) * lung, HU_GROUND_GLASS)
    blend(canvas.hu, box, soft_inside(depth - thick, edge) * lung, HU_WALL)
    canvas.labels[box][lung & (depth < fibrosis)] = LABELS["pleural_thickening"]


def _lung_tissue(canvas: Canvas, box) -> np.ndarray:
    tissue = canvas.anatomy.tissue[box]
    return (tissue == LUNG) | (tissue == VESSEL)


def paint_emphysema(canvas: Canvas, lesion: Lesion) -> None:
    """Low-attenuation patch (about -950 HU) with darker centrilobular holes (label 4)."""
    box, (dz, dy, dx) = canvas.local(lesion.center, (1 + OUTLINE_BUMP) * lesion.size)
    rng = np.random.default_rng(lesion.seed)
    outline, holes = (
        SmoothField(rng, (20, 60), 5)(dz, dy, dx),
        SmoothField(rng, (4, 9), 8)(dz, dy, dx),
    )
    dist = np.sqrt(dz * dz + dy * dy + dx * dx) - lesion.size * (
        1 + OUTLINE_BUMP * np.clip(outline, -1, 1)
    )
    parenchyma = canvas.anatomy.tissue[box] == LUNG  # vessels run through emphysema unchanged
    value = np.where(holes > 0.7, -990.0, HU_EMPHYSEMA + 10.0 * holes).astype(np.float32)
    blend(canvas.hu, box, soft_inside(dist, canvas.grid.voxel_mm) * parenchyma, value)
    canvas.labels[box][(dist < 0) & _lung_tissue(canvas, box)] = LABELS["preexisting"]


def paint_consolidation(canvas: Canvas, lesion: Lesion) -> None:
    """Soft-tissue patch (about 0 HU) with a ground-glass rim; airways stay air (bronchograms)."""
    box, (dz, dy, dx) = canvas.local(lesion.center, (1 + OUTLINE_BUMP) * lesion.size + 4.0)
    rng = np.random.default_rng(lesion.seed)
    outline, texture = (
        SmoothField(rng, (15, 50), 5)(dz, dy, dx),
        SmoothField(rng, (5, 15), 5)(dz, dy, dx),
    )
    dist = np.sqrt(dz * dz + dy * dy + dx * dx) - lesion.size * (
        1 + OUTLINE_BUMP * np.clip(outline, -1, 1)
    )
    keep = canvas.anatomy.lung[box] & (canvas.anatomy.tissue[box] != AIRWAY)
    edge = canvas.grid.voxel_mm
    blend(canvas.hu, box, soft_inside(dist - 4.0, edge) * keep, -550.0)  # ground-glass rim
    blend(canvas.hu, box, soft_inside(dist, edge) * keep, 5.0 + 20.0 * texture)
    canvas.labels[box][(dist < 0) & _lung_tissue(canvas, box)] = LABELS["preexisting"]


def paint_bronchiectasis(canvas: Canvas, lesion: Lesion) -> None:
    """A cluster of dilated, thick-walled airways (tram lines and rings) inside the lung."""
    rng = np.random.default_rng(lesion.seed)
    box, (dz, dy, dx) = canvas.local(
        lesion.center, confounder_extent("bronchiectasis", lesion.size)
    )
    lung, edge = _lung_tissue(canvas, box), canvas.grid.voxel_mm
    vox = max(canvas.grid.spacing)
    for _ in range(int(rng.integers(3, 6))):
        start = _unit(rng) * rng.uniform(0.0, 0.4) * lesion.size
        direction = _unit(rng) * np.array([0.5, 1.0, 1.0])  # mostly in-plane airways
        direction *= rng.uniform(0.4, 0.7) * lesion.size / np.linalg.norm(direction)
        a, b = start - direction, start + direction
        lumen, wall = min(max(rng.uniform(2.0, 3.5), 0.5 * vox), 3.5), rng.uniform(1.5, 2.5)
        dist = segment_distance(dz, dy, dx, a, b)
        blend(canvas.hu, box, tube_fraction(dist, lumen + wall, edge) * lung, HU_SOFT)
        blend(canvas.hu, box, tube_fraction(dist, lumen, edge) * lung, HU_AIR)
        canvas.labels[box][(dist < lumen + wall) & lung] = LABELS["preexisting"]


PAINTERS = {
    "emphysema": paint_emphysema,
    "consolidation": paint_consolidation,
    "bronchiectasis": paint_bronchiectasis,
    "pleural_thickening": paint_pleural,
}


PAINT_ORDER = {"pleural_thickening": 1, "cavity": 2}  # confounders 0: later ones paint over


def paint_lesions(canvas: Canvas, lesions: list[Lesion], scan: int, n_scans: int) -> None:
    """Paint the lesions visible at ``scan``: confounders, pleural thickening, then cavities."""
    for lesion in sorted(lesions, key=lambda lesion: PAINT_ORDER.get(lesion.kind, 0)):
        scale = lesion.scale(scan, n_scans)
        if scale <= 0:
            continue
        if lesion.kind == "cavity":
            ball = "ball_fraction" in lesion.params and scan >= lesion.params["ball_onset"]
            paint_cavity(canvas, lesion, scale, ball)
        elif lesion.kind == "pleural_thickening":
            paint_pleural(canvas, lesion, scale)
        else:
            PAINTERS[lesion.kind](canvas, lesion)


def annotations_from_labels(labels: np.ndarray, box: LungBox, grid: Grid) -> dict:
    """The 24 sub-region flags (paper 1.2) read off a label map: 1 where a label reached voxels.

    Deriving flags from the painted voxels (not from the plan) keeps the manifest and the label
    maps consistent even when a lesion is too small to show at some scan.
    """
    flags = {region: dict.fromkeys(ANNOTATION_FLAGS, 0) for region in SUBREGIONS}
    idx = np.argwhere(labels > 0)
    if idx.size:
        mm = grid.to_mm(idx)
        regions = box.region_of(mm[:, 0], mm[:, 2])
        values = labels[tuple(idx.T)]
        names = {v: k for k, v in LABELS.items()}
        for region, value in set(zip(regions.tolist(), values.tolist(), strict=True)):
            flags[SUBREGIONS[region]][names[value]] = 1
    return flags
