"""Every number the SAPSAM paper fixes, in one place, each with the section it comes from.

Zusag et al., "Sparsely Annotated Pathological Sign Activation Maps", 2019 (``shared/paper``).
Stages take these frozen dataclasses as arguments; presets are built by overriding the paper's
values (``PAPER`` is the paper, ``QUICK`` a small grid for CPUs and tests)::

    from sapsam_jax.config import PAPER, QUICK, preprocess_preset
    cfg = preprocess_preset("quick")
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np

# Paper 1.2 / Table 1: the three CPA signs labelled per sub-region, plus the pre-existing flag.
SIGNS = ("cavity", "fungus_ball", "pleural_thickening")
TASKS = ("disease", "signs", "survival")  # paper 3.1, 3.2, 3.3
# A sign task's --sign: one sign, one binary network per sign ("all", paper 2.4), or one network
# with an output per sign ("multi").
SIGN_CHOICES = SIGNS + ("all", "multi")
ANNOTATION_FLAGS = ("preexisting",) + SIGNS
# Paper 1.2: six sub-regions, left/right x upper/middle/lower, by the patient's own side.
SUBREGIONS = (
    "left_upper",
    "left_middle",
    "left_lower",
    "right_upper",
    "right_middle",
    "right_lower",
)
# Canonical CT orientation (sapsam_jax.io): hu[k, j, i], i -> patient Left, j -> Posterior,
# k -> Superior. A projection along an axis averages over that array axis.
AXES = {"axial": 0, "coronal": 1, "sagittal": 2}

# Paper 2.2: three HU ranges become the three RGB-like channels (air-like, lung, soft tissue).
PAPER_BANDS = ((-1400.0, -900.0), (-900.0, -160.0), (-160.0, 240.0))


@dataclass(frozen=True)
class SegmentationConfig:
    """Lung segmentation, paper 2.1. Pixel sizes are the paper's, converted to mm at its grid."""

    threshold_hu: float = -570.0  # paper 2.1: "thresholding the voxels at -570 HU"
    # Paper 1.1: scans were worked at their lowest in-plane resolution, 0.9 mm per pixel; marker
    # radii given in pixels (paper 2.1) are converted to mm with it, so masks work at any spacing.
    paper_pixel_mm: float = 0.9
    intermediate_marker_radius_px: float = 10.0  # paper 2.1: intermediate markers, radius 10 px
    external_marker_radius_px: float = 35.0  # paper 2.1: external markers, radius 35 px
    # Air counts only inside the body. The table shell touching the patient's back is cut off
    # by an in-plane erosion of this many mm first (table shells are thinner than twice this,
    # the chest wall is much thicker); not in the paper.
    body_erosion_mm: float = 3.0
    # Paper 2.1 "removing the smallest" components: air pockets under this volume are not lung.
    min_component_ml: float = 5.0
    # Paper 2.1 keeps the large components as lungs. Not in the paper, chosen on the real scans
    # in shared/data/real_ct: a component is lung when it is at least this fraction of the
    # largest lung-like one (a second lung is >= 0.3 of the first; stomach or bowel gas and
    # table cavities are smaller or fail the gas test below) ...
    keep_fraction: float = 0.1
    # ... and is not gas: lung parenchyma is denser than air, -950 HU being the usual emphysema
    # cut-off (LAA-950), so even emphysematous lungs keep most voxels above it, while bowel
    # and stomach gas sit below it.
    pure_air_hu: float = -950.0
    gas_fraction_max: float = 0.5
    # Other air pockets down to min_pocket_ml are kept when lung surrounds them (cavities,
    # bullae, paper 1.2): at least this fraction of the shell within the intermediate-marker
    # radius is lung. Smaller specks are noise (not in the paper). A cavity walled off on its
    # pleural side by pleural thickening still has about a third of its shell in lung; gas
    # outside the lungs (bowel, stomach) has next to none.
    enclosed_fraction: float = 0.3
    min_pocket_ml: float = 0.5
    # Trachea and extra-pulmonary bronchi are removed: chains of axial cross-sections that are
    # smaller than this (a 30 mm disc; the adult trachea is <= 25 mm wide), mostly in the
    # paper's air-like band (< -900 HU, paper 2.2), and rise above the lung apices.
    airway_hu: float = -900.0
    airway_max_area_mm2: float = 700.0
    # Below the first slice where the trachea touches a lung (a thin wall, partial volume), its
    # lumen (< airway_hu) is followed down slice by slice while the tissue around it, from two
    # voxels to one voxel plus this many mm beyond the lumen, is mostly not lung: the trachea
    # and main bronchi run through the mediastinum, bronchi inside the lung are ringed by
    # parenchyma (not in the paper; measured on cip_ct64, README "Lung segmentation").
    airway_shell_mm: float = 6.0
    airway_shell_lung_max: float = 0.5
    # The refined mask closes each lung on its own. Lungs touching at the junction lines (or
    # joined by bronchial stubs) are told apart by an erosion of this radius, in mm: junctions
    # are a few mm thick, lungs several cm (not in the paper).
    lung_split_radius_mm: float = 5.0
    # Morphology with the large radii (9-32 mm: marker extents, top-hat) runs on a grid of about
    # this voxel size; an error of one such voxel is small against the radii (not in the paper).
    coarse_voxel_mm: float = 2.0
    # Holes filled per axial slice (paper 2.1) are vessels, airway walls and small nodules: no
    # disc of this radius fits in them. Thicker holes a slice shows ringed by lung are lesions
    # (the refined mask fills those when lung encloses them in 3-D) or diaphragm domes cut
    # across at the lung bases, which are not lung (not in the paper).
    hole_max_radius_mm: float = 5.0
    # Conservative mask (paper 2.1): closing then opening radii, in mm.
    closing_radius_mm: float = 3.0
    opening_radius_mm: float = 1.5
    # Refined mask watershed (paper 2.1, Fig. 2b) on a Sobel edge map quantised to this many
    # levels (reference [5] of the paper rescales its Sobel map to 0..255), face connectivity.
    watershed_levels: int = 256
    watershed_connectivity: int = 1
    # Refined mask top-hat (paper 2.1, Fig. 2c): each lung is closed with a ball of the external
    # markers' radius, the paper's bound on where lung tissue may be added (35 px), so bays of
    # juxtapleural soft tissue (fungus balls, pleural thickening, tumours) up to ~6 cm across
    # fill. Measured on the real scans: 20 px takes in a third of what 35 px does of the
    # tumours, for the same mask volume (README, "Lung segmentation", "Measured").
    tophat_radius_px: float = 35.0
    # What the masks may add to the thresholded air (watershed, top-hat, filled holes): soft
    # tissue and fluid, never bone (cortical bone > 300 HU; the paper's soft-tissue band ends
    # at 240 HU, paper 2.2).
    soft_tissue_max_hu: float = 300.0

    @property
    def intermediate_marker_radius_mm(self) -> float:
        return self.intermediate_marker_radius_px * self.paper_pixel_mm

    @property
    def external_marker_radius_mm(self) -> float:
        return self.external_marker_radius_px * self.paper_pixel_mm

    @property
    def tophat_radius_mm(self) -> float:
        return self.tophat_radius_px * self.paper_pixel_mm


@dataclass(frozen=True)
class GeometryConfig:
    """Resampling and 3-D rotation augmentation, paper 2.3."""

    # Paper 2.3: "rescaled to 512x512x432 pixels" (x, y, z) -> (k, j, i) = (432, 512, 512).
    grid_shape: tuple[int, int, int] = (432, 512, 512)
    downsample: int = 2  # paper 2.3: "downsampled by 2 in each direction"
    # Paper 2.3: "rotating each scan in 3D by +-5 degrees around each axis, i.e. 27 rotations".
    rotation_angles_deg: tuple[float, ...] = (-5.0, 0.0, 5.0)
    # Not in the paper: the lung bounding box (refined mask, ARCHITECTURE.md) is grown by this
    # margin so pleural signs at the lung edge (paper 1.2) stay inside the resampled grid.
    bbox_margin_mm: float = 5.0
    # Not in the paper: voxels that a rotation or the crop brings in from outside are air.
    fill_hu: float = -1024.0
    # Masks are resampled/rotated linearly and re-thresholded here (a majority vote per voxel).
    mask_threshold: float = 0.5
    # Gaussian anti-aliasing before shrinking, sigma = (zoom - 1) / 2 voxels (skimage.resize).
    anti_alias: bool = True
    # QC only, not in the paper: adult lung volumes at full inspiration (paper 1.1) outside this
    # range (mL) mean a failed segmentation or a non-chest scan.
    plausible_lung_ml: tuple[float, float] = (1000.0, 10000.0)

    @property
    def working_shape(self) -> tuple[int, int, int]:
        """Shape of the resampled, downsampled volume that is rotated and projected."""
        return tuple(n // self.downsample for n in self.grid_shape)

    @property
    def subregion_shape(self) -> tuple[int, int, int]:
        """(k, j, i) size of one of the six sub-regions: thirds along k, halves along i.

        On the paper grid this is (72, 256, 128), the paper's 256x128x72 voxels (paper 2.3).
        """
        k, j, i = self.working_shape
        return (k // 3, j, i // 2)

    def rotations(self) -> list[tuple[float, float, float]]:
        """The 27 (about-k, about-j, about-i) angle triples; index 13 is the identity."""
        return list(itertools.product(self.rotation_angles_deg, repeat=3))

    @property
    def identity_rotation_index(self) -> int:
        return self.rotations().index((0.0, 0.0, 0.0))


@dataclass(frozen=True)
class ProjectionConfig:
    """Average-intensity projections, paper 2.2-2.3."""

    bands: tuple[tuple[float, float], ...] = PAPER_BANDS
    # Paper 2.3 rescales grayscale projections to [0, 1]. A fixed HU window (not per-image
    # min/max) keeps intensities comparable across scans. The conservative mask (paper 2.1) holds
    # voxels below -570 HU plus what closing adds, so the mean HU of its rays lies in about
    # [-1000, -500]: that is the window. (-1000, 0) left the lungs in 0.13-0.5 of the range, and a
    # from-scratch network on the quick cohort did not learn the disease task at all (training
    # loss 0.69 for 15 epochs; 0.06 with this window).
    gray_window_hu: tuple[float, float] = (-1000.0, -500.0)


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything the preprocessing of one scan needs."""

    name: str = "paper"
    segmentation: SegmentationConfig = SegmentationConfig()
    geometry: GeometryConfig = GeometryConfig()
    projection: ProjectionConfig = ProjectionConfig()


PAPER = PreprocessConfig()
# Small grid for CPUs and tests: same physics, 1/4 of the paper's voxels per axis before the /2.
QUICK = dataclasses.replace(
    PAPER, name="quick", geometry=GeometryConfig(grid_shape=(108, 128, 128))
)
# For tests and the tiny training preset: 1/8 of the paper's voxels per axis before the /2.
TINY = dataclasses.replace(PAPER, name="tiny", geometry=GeometryConfig(grid_shape=(54, 64, 64)))
PREPROCESS_PRESETS = {"paper": PAPER, "quick": QUICK, "tiny": TINY}


def preprocess_preset(name: str) -> PreprocessConfig:
    """The preprocessing preset called ``name`` ("paper" or "quick")."""
    try:
        return PREPROCESS_PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown preset {name!r}; expected one of {', '.join(PREPROCESS_PRESETS)}"
        ) from None


def rotation_matrix(angles_deg) -> np.ndarray:
    """3x3 matrix acting on (k, j, i) coordinates: rotate about k, then j, then i.

    Composed once so each of the 27 augmentations is one interpolation (paper 2.3).
    """
    a_k, a_j, a_i = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))

    def plane(theta, p, q):
        m = np.eye(3)
        c, s = np.cos(theta), np.sin(theta)
        m[p, p], m[p, q], m[q, p], m[q, q] = c, -s, s, c
        return m

    # Rotation about axis k turns the (j, i) plane, about j the (k, i) plane, about i the (k, j).
    return plane(a_i, 0, 1) @ plane(a_j, 0, 2) @ plane(a_k, 1, 2)
