"""A synthetic CPA cohort: patients, longitudinal scans, labels, files and the manifest.

Mirrors the paper's cohort (paper 1.1): CPA patients with 1-3 longitudinal scans whose signs
persist or grow, control patients without lung disease, sparse sub-region annotations of the CPA
scans (paper 1.2, Table 1) and a 2-year survival label that depends on sign burden (paper 3.3).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ...config import ANNOTATION_FLAGS, SUBREGIONS
from ...io import CTVolume, Study, save_nifti, write_manifest
from .._cache import atomic_write_json
from ._anatomy import OUTSIDE, Anatomy, render_anatomy, sample_anatomy
from ._dicom_writer import RESCALE_INTERCEPT, write_dicom_series
from ._grid import DEFAULT_SHAPE, Grid, default_spacing
from ._lesions import (
    Canvas,
    Lesion,
    LungBox,
    Planner,
    annotations_from_labels,
    paint_lesions,
    plan_lesions,
)

MANIFEST_NAME = "manifest.csv"
# While a cohort is generated: its parameters, and one file per finished patient holding its
# manifest rows, so that an interrupted run resumes (both are removed with the manifest written).
PLAN_FILE = ".cohort-plan.json"
DONE_DIR = ".patients-done"
# Bumped whenever the generator draws different cohorts from the same arguments, so a cohort
# cached by an older version is not reused (train.ensure_synthetic_cohort names folders by it).
# 2: cavities and fungus balls are at least the size the grid resolves (_lesions.MIN_LUMEN).
# 3: pleural thickening paints only under its lens; 2 also brightened the lung's outermost voxels
#    over the whole painting box (up to ~8 cm from the patch, into other sub-regions, unlabelled).
GENERATOR_VERSION = 3
# About a quarter of the patients are controls: paper 1.1 has 76 control studies of 352 (22 %;
# its patients are not counted by group). The quick disease task uses half (train/_config.py).
DEFAULT_CONTROL_FRACTION = 0.25
MIN_SHAPE = 16  # voxels per axis of the smallest grid make_cohort draws
NOISE_SIGMA_HU = (12.0, 22.0)  # per-scan image noise, spatially correlated like CT noise
NOISE_CORRELATION_VOXELS = 0.7
# Paper 3.3: 43 of 143 CPA patients (30 %) died within two years; this midpoint gives 27 % on
# the default grid (bench_cohort_rates.py).
SURVIVAL_SLOPE = 1.2
SURVIVAL_MIDPOINT = 6.75
POSITION_JITTER_MM = (5.0, 4.0, 4.0)  # patient positioning differs a little between scans


@dataclass
class SyntheticScan:
    """One generated study, in memory, on ``grid``: int16 ``hu``, uint8 lesion ``labels``
    (``LABELS``), and the truth the files do not carry: ``lung`` (lungs incl. vessels and
    lesions) and ``tissue`` (anatomy codes of ``_anatomy``, lesions not included)."""

    study_id: str
    patient_id: str
    scan_index: int
    grid: Grid
    hu: np.ndarray
    labels: np.ndarray
    cpa: int
    survival_2y: int | None
    annotations: dict[str, dict[str, int]]
    lung: np.ndarray | None = None
    tissue: np.ndarray | None = None

    @property
    def affine(self) -> np.ndarray:
        """(k, j, i, 1) -> LPS mm; voxel (0, 0, 0) is at the grid's corner, centre at 0."""
        z0, y0, x0 = (round(float(v), 6) for v in self.grid.to_mm([0, 0, 0]))
        dk, dj, di = self.grid.spacing
        return np.array([[0, 0, di, x0], [0, dj, 0, y0], [dk, 0, 0, z0], [0, 0, 0, 1]], float)

    def ct_volume(self) -> CTVolume:
        return CTVolume(self.hu, tuple(float(s) for s in self.grid.spacing), self.affine)


def patient_id_of(index: int) -> str:
    return f"SYN{index:04d}"


def _rng(seed: int, *keys: int) -> np.random.Generator:
    """Independent stream per (seed, patient, scan): a patient's anatomy and lesions do not
    depend on the cohort size (whether it is a control and its scan count are drawn per cohort)."""
    return np.random.default_rng([int(seed), *map(int, keys)])


def _plan_patient(index: int, cpa: bool, n_scans: int, shape, spacing, seed: int):
    """(grid, rng, anatomy, lesions) of patient ``index``; ``rng`` continues the patient's stream
    (survival is drawn from it next), so generate_patient and lesion_twins draw the same patient."""
    grid = Grid(tuple(int(n) for n in shape), tuple(spacing or default_spacing(shape)))
    rng = _rng(seed, index)
    anatomy = render_anatomy(sample_anatomy(rng, grid), grid, rng)
    lesions = plan_lesions(Planner(anatomy, rng), rng, n_scans) if cpa else []
    return grid, rng, anatomy, lesions


def generate_patient(
    index: int,
    *,
    cpa: bool,
    n_scans: int = 1,
    shape=DEFAULT_SHAPE,
    spacing=None,
    seed: int = 0,
) -> list[SyntheticScan]:
    """All scans of one patient, in memory (no files). Deterministic in (seed, index)."""
    grid, rng, anatomy, lesions = _plan_patient(index, cpa, n_scans, shape, spacing, seed)
    survival = _survival(lesions, rng) if cpa else None
    box = LungBox.from_mask(anatomy.lung, grid)
    scans = []
    for s in range(n_scans):
        hu, labels = _render_scan(anatomy, lesions, s, n_scans, _rng(seed, index, s, 1))
        flags = annotations_from_labels(labels, box, grid)
        hu, labels, lung, tissue = _jitter(
            [hu, labels, anatomy.lung, anatomy.tissue], grid, _rng(seed, index, s, 2)
        )
        pid = patient_id_of(index)
        scans.append(
            SyntheticScan(
                study_id=f"{pid}_S{s + 1:02d}",
                patient_id=pid,
                scan_index=s,
                grid=grid,
                hu=hu,
                labels=labels,
                cpa=int(cpa),
                survival_2y=survival,
                annotations=flags,
                lung=lung,
                tissue=tissue,
            )
        )
    return scans


def lesion_twins(
    index: int, *, n_scans: int = 1, shape=DEFAULT_SHAPE, spacing=None, seed: int = 0
) -> tuple[np.ndarray, list[tuple[Lesion, np.ndarray]]]:
    """The last scan of CPA patient ``index`` without its lesions, and with each lesion alone.

    Same anatomy, same noise: the difference between a twin and the lesion-free scan is what that
    one lesion adds to the CT (``benchmarks/bench_lesion_contrast.py`` measures what it adds to
    the projections). Drawn like :func:`generate_patient` (``cpa=True``, same seed and index).
    Returns ``(hu_without, [(lesion, hu_with_it_alone), ...])``, int16 like the written scans.
    """
    _, _, anatomy, lesions = _plan_patient(index, True, n_scans, shape, spacing, seed)
    last = n_scans - 1

    def render(painted):
        return _render_scan(anatomy, painted, last, n_scans, _rng(seed, index, last, 1))[0]

    visible = [lesion for lesion in lesions if lesion.scale(last, n_scans) > 0]
    return render([]), [(lesion, render([lesion])) for lesion in visible]


def scan_twins(
    index: int, *, n_scans: int, scan: int, shape=DEFAULT_SHAPE, spacing=None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, list[Lesion]]:
    """Scan ``scan`` of CPA patient ``index`` without its lesions and with all of them, and the
    lesions it shows. Same anatomy, same noise (not repositioned: the two overlay voxel for
    voxel); drawn like :func:`generate_patient` (``cpa=True``, same seed, index and scan count).
    """
    _, _, anatomy, lesions = _plan_patient(index, True, n_scans, shape, spacing, seed)

    def render(painted):
        return _render_scan(anatomy, painted, scan, n_scans, _rng(seed, index, scan, 1))[0]

    shown = [lesion for lesion in lesions if lesion.scale(scan, n_scans) > 0]
    return render([]), render(lesions), shown


def _render_scan(anatomy: Anatomy, lesions: list[Lesion], scan: int, n_scans: int, rng):
    """Anatomy + the lesions visible at ``scan`` + correlated noise inside the body, as int16."""
    canvas = Canvas(anatomy, anatomy.hu.copy(), np.zeros(anatomy.grid.shape, np.uint8))
    paint_lesions(canvas, lesions, scan, n_scans)
    noise = ndi.gaussian_filter(
        rng.standard_normal(anatomy.grid.shape, dtype=np.float32),
        NOISE_CORRELATION_VOXELS,
        truncate=3.0,
    )
    noise *= np.float32(rng.uniform(*NOISE_SIGMA_HU) / max(float(noise.std()), 1e-6))
    # Outside the body stays exactly air (-1000 HU), as after a scanner's field-of-view masking.
    noise[anatomy.tissue == OUTSIDE] = 0.0
    canvas.hu += noise
    hu = np.clip(np.rint(canvas.hu), RESCALE_INTERCEPT, 3071).astype(np.int16)
    return hu, canvas.labels


def _jitter(arrays, grid: Grid, rng):
    """Shift the patient by whole voxels (edge slices repeat), as repositioning would."""
    shift = [
        int(round(rng.uniform(-m, m) / s))
        for m, s in zip(POSITION_JITTER_MM, grid.spacing, strict=True)
    ]
    for axis, s in enumerate(shift):
        if s:
            index = np.clip(np.arange(grid.shape[axis]) - s, 0, grid.shape[axis] - 1)
            arrays = [a.take(index, axis=axis) for a in arrays]
    return arrays


def _survival(lesions: list[Lesion], rng) -> int:
    """1 = alive two years after the scans, 0 = died within two years (paper 3.3).

    The risk grows with sign burden at the last scan (cavity volume, fungus balls, pleural
    thickening, involved sub-regions, pre-existing disease) plus noise, so survival is learnable
    from the images but not a function of them.
    """
    burden = sign_burden(lesions)
    return int(SURVIVAL_SLOPE * (burden - SURVIVAL_MIDPOINT) + rng.normal() < 0)


def sign_burden(lesions: list[Lesion]) -> float:
    """Disease burden at the last scan, the driver of the synthetic 2-year mortality."""
    cavity_ml = sum(4 / 3 * np.pi * les.size**3 / 1000 for les in lesions if les.kind == "cavity")
    balls = sum("ball_fraction" in les.params for les in lesions)
    pleural = sum(les.kind == "pleural_thickening" for les in lesions)
    regions = len({les.region for les in lesions if les.is_sign})
    confounders = sum(not les.is_sign for les in lesions)
    return cavity_ml / 15 + 0.8 * balls + 0.6 * pleural + 0.4 * regions + 0.4 * confounders


# ----------------------------------------------------------------------------- files


def _study_fields(scan: SyntheticScan, ct_path: Path, labels_path: Path) -> dict:
    """Keyword arguments of the scan's manifest ``Study`` (plain, so worker processes can send
    them back; a Study holds read-only mappings, which do not pickle)."""
    annotations = {r: {f: scan.annotations[r][f] for f in ANNOTATION_FLAGS} for r in SUBREGIONS}
    return {
        "study_id": scan.study_id,
        "patient_id": scan.patient_id,
        "path": ct_path,
        "cpa": scan.cpa,
        "survival_2y": scan.survival_2y,
        "annotations": annotations,
        "lesion_labels": labels_path,
    }


def _write_files(scan: SyntheticScan, out_dir: Path, fmt: str, seed: int) -> dict:
    ct = scan.ct_volume()
    if fmt == "dicom":
        ct_path = out_dir / "studies" / scan.study_id
        # Synthetic study dates, 200 days apart, order a patient's longitudinal scans.
        date = datetime.date(2010, 1, 1) + datetime.timedelta(days=200 * scan.scan_index)
        write_dicom_series(
            ct_path,
            scan.hu,
            scan.grid.spacing,
            ct.affine[:3, 3],
            # UIDs are a function of the content: the same study id in cohorts of another size
            # can be another scan (which patients are controls is drawn per cohort), and two
            # different images must never share UIDs (a PACS would merge them). Reruns repeat them.
            uid_seed=f"{seed}/{scan.grid.shape}/{scan.grid.spacing}/{_digest(scan.hu)}",
            patient_id=scan.patient_id,
            study_id=scan.study_id,
            date=date.strftime("%Y%m%d"),
        )
    elif fmt == "nifti":
        ct_path = save_nifti(out_dir / "studies" / f"{scan.study_id}.nii.gz", scan.hu, ct)
    else:
        raise ValueError(f"fmt must be 'dicom' or 'nifti', not {fmt!r}")
    labels_path = save_nifti(
        out_dir / "labels" / f"{scan.study_id}_lesions.nii.gz", scan.labels, ct
    )
    return _study_fields(scan, ct_path, labels_path)


def _digest(array: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=12).hexdigest()


def write_scan(scan: SyntheticScan, out_dir, fmt: str = "dicom", seed: int = 0) -> Study:
    """Write a scan's CT (DICOM folder or NIfTI) and label map; returns its manifest row.

    ``seed`` seeds the DICOM UIDs (use the cohort's seed for reproducible files).
    """
    return Study(**_write_files(scan, Path(out_dir), fmt, seed))


def cohort_plan(
    n_patients: int,
    scans_per_patient=(1, 3),
    control_fraction: float = DEFAULT_CONTROL_FRACTION,
    seed: int = 0,
) -> list[tuple[int, bool, int]]:
    """(index, cpa, n_scans) of every patient :func:`make_cohort` draws with these arguments."""
    return _plan_cohort(n_patients, tuple(scans_per_patient), control_fraction, seed)


def _plan_cohort(n_patients: int, scans_per_patient, control_fraction: float, seed: int):
    """(index, cpa, n_scans) per patient; the control count is exact, their places random."""
    rng = _rng(seed, 1_000_003)
    n_controls = int(np.floor(control_fraction * n_patients + 0.5))  # halves up, not to even
    controls = set(rng.choice(n_patients, size=n_controls, replace=False).tolist())
    lo, hi = scans_per_patient
    counts = rng.integers(lo, hi + 1, size=n_patients)
    return [(i, i not in controls, int(counts[i])) for i in range(n_patients)]


def _write_patient(out_dir: Path, fmt: str, seed: int, shape, spacing, patient) -> list[dict]:
    """Generate and write one patient's scans (a worker's unit of work); a patient an
    interrupted run finished is not generated again."""
    index, cpa, n_scans = patient
    done = out_dir / DONE_DIR / f"patient-{index:05d}.json"
    if done.exists():
        return _read_done_rows(done, out_dir)
    scans = generate_patient(
        index, cpa=cpa, n_scans=n_scans, shape=shape, spacing=spacing, seed=seed
    )
    rows = [_write_files(scan, out_dir, fmt, seed) for scan in scans]
    # After every file of the patient (each written atomically). Paths relative to the cohort's
    # folder, so a folder moved before the rerun still resumes to a manifest of its own files.
    relative = [{**row, **{k: row[k].relative_to(out_dir) for k in _PATHS}} for row in rows]
    atomic_write_json(done, relative)
    return rows


_PATHS = ("path", "lesion_labels")


def _read_done_rows(path: Path, out_dir: Path) -> list[dict]:
    rows = json.loads(path.read_text())
    for row in rows:
        for key in _PATHS:
            row[key] = out_dir / row[key]  # absolute (older records) stay as they are
    return rows


def _auto_workers(n_patients: int, shape) -> int:
    """Worker processes for a cohort: one for small grids (spawning costs seconds), else as many
    as cores and memory allow (about 60 bytes per voxel in flight per worker)."""
    voxels = int(np.prod(shape))
    if voxels < 4_000_000:
        return 1
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        free = 8 * 2**30
    by_memory = max(1, int(0.7 * free // (60 * voxels)))
    return max(1, min(os.cpu_count() or 1, n_patients, by_memory))


def _run(work, plan, workers: int, bar) -> list[Study]:
    """Apply ``work`` to every patient of ``plan``, in ``workers`` processes; Studies in order."""
    with contextlib.ExitStack() as stack:
        if workers > 1:
            # spawn, not fork: the caller may hold JAX or BLAS threads that fork would break.
            context = multiprocessing.get_context("spawn")
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=context))
            results = pool.map(work, plan)
        else:
            results = map(work, plan)
        studies = []
        for patient_studies in results:  # in patient order, whatever the completion order
            studies.extend(Study(**fields) for fields in patient_studies)
            bar.update(len(patient_studies))
    return studies


def _prepare_folder(out_dir: Path, overwrite: bool, plan: dict) -> bool:
    """Make ``out_dir`` ready for the cohort ``plan`` (its parameters); True when it resumes an
    interrupted run of the same plan (no manifest yet: it is written last)."""
    names = (MANIFEST_NAME, "studies", "labels", PLAN_FILE, DONE_DIR)
    old = [out_dir / name for name in names if (out_dir / name).exists()]
    if not old:
        return False
    finished = (out_dir / MANIFEST_NAME).exists()
    if not overwrite:
        recorded = None if finished else _read_plan(out_dir)
        if recorded == plan:
            return True
        what = "a cohort" if finished else "an unfinished cohort of other parameters"
        detail = ""
        if recorded is not None:  # which ones: the same call with them finishes that cohort
            differ = [
                f"{key} {recorded.get(key)!r} there, {plan[key]!r} here"
                for key in plan
                if recorded.get(key) != plan[key]
            ]
            detail = f" ({'; '.join(differ)}); rerun with its parameters to finish it"
        raise FileExistsError(
            f"{out_dir} holds {what} already ({', '.join(p.name for p in old)}){detail}; choose "
            "another folder or overwrite it (--overwrite, overwrite=True)"
        )
    # The manifest first: an interrupted overwrite must not leave it describing deleted or new
    # images with old labels. The new one is written when every study is.
    for path in old:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return False


def _read_plan(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / PLAN_FILE).read_text())
    except (OSError, ValueError):
        return None


def _plan_record(**parameters) -> dict:
    """The parameters that decide a cohort's files, as JSON gives them back."""
    return json.loads(json.dumps({"generator_version": GENERATOR_VERSION, **parameters}))


def make_cohort(
    out_dir,
    n_patients: int = 24,
    shape=DEFAULT_SHAPE,
    spacing=None,
    seed: int = 0,
    fmt: str = "dicom",
    scans_per_patient=(1, 3),
    control_fraction: float = DEFAULT_CONTROL_FRACTION,
    progress: bool = True,
    workers: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Generate a synthetic CPA cohort in ``out_dir`` and return its manifest path.

    Writes ``studies/<study_id>`` (DICOM series) or ``studies/<study_id>.nii.gz``,
    ``labels/<study_id>_lesions.nii.gz`` (0 background, 1 cavity, 2 fungus ball, 3 pleural
    thickening, 4 pre-existing condition) and ``manifest.csv`` (docs/ARCHITECTURE.md).
    ``spacing=None`` keeps the default field of view (about 280 x 346 x 346 mm) at any ``shape``.
    ``workers``: processes generating patients in parallel (None: one for small grids, else by
    cores and free memory); the output does not depend on it. A folder that holds a cohort
    already is refused unless ``overwrite``, which deletes its manifest, studies and labels first
    (files of the old cohort left beside the new one would be taken for it). An interrupted call
    resumes when called again with the same arguments: until the manifest is written the folder
    records them (``PLAN_FILE``) and every finished patient (``DONE_DIR``).
    """
    from tqdm.auto import tqdm

    if fmt not in ("dicom", "nifti"):
        raise ValueError(f"fmt must be 'dicom' or 'nifti', not {fmt!r}")
    lo, hi = scans_per_patient
    problems = [
        f"{what} (got {got})"
        for bad, what, got in (
            (n_patients < 1, "n_patients must be >= 1", n_patients),
            (not 1 <= lo <= hi, "scans per patient take 1 <= min <= max", tuple(scans_per_patient)),
            (
                not 0.0 <= control_fraction <= 1.0,
                "control_fraction must be in 0..1",
                control_fraction,
            ),
            # A policy: smaller grids draw lungs of a few voxels (and 2x2x2 or a 0 axis crashed).
            (
                len(shape) != 3 or min(shape) < MIN_SHAPE,
                f"shape takes 3 sizes of at least {MIN_SHAPE} voxels",
                tuple(shape),
            ),
        )
        if bad
    ]
    if problems:  # only what is wrong: the message listed every rule, met or not
        raise ValueError("; ".join(problems))
    if spacing is not None and (len(spacing) != 3 or not min(spacing) > 0):
        raise ValueError(f"spacing takes 3 voxel sizes in mm, all > 0 (got {tuple(spacing)})")
    # Absolute, so the studies' paths do not depend on the working directory (the manifest
    # writes them relative to its own folder).
    out_dir = Path(out_dir).expanduser().resolve()
    record = _plan_record(
        n_patients=n_patients,
        shape=shape,
        spacing=spacing,
        seed=seed,
        fmt=fmt,
        scans_per_patient=scans_per_patient,
        control_fraction=control_fraction,
    )
    if not _prepare_folder(out_dir, overwrite, record):
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / PLAN_FILE, record)
    plan = _plan_cohort(n_patients, scans_per_patient, control_fraction, seed)
    work = functools.partial(_write_patient, out_dir, fmt, seed, shape, spacing)
    workers = _auto_workers(n_patients, shape) if workers is None else max(1, int(workers))
    # disable=None: a bar on a terminal, nothing in a log file (its \r updates would flood it).
    bar = tqdm(
        total=sum(n for *_, n in plan),
        desc="synthetic cohort",
        unit="scan",
        disable=None if progress else True,
    )
    with bar:
        try:
            studies = _run(work, plan, workers, bar)
        except BrokenProcessPool as err:
            # e.g. a caller without an importable __main__ (python - < script): go serial.
            warnings.warn(
                f"synthetic cohort: worker processes failed ({err}); running serially",
                RuntimeWarning,
                stacklevel=2,
            )
            bar.reset()
            studies = _run(work, plan, 1, bar)
    manifest = write_manifest(out_dir / MANIFEST_NAME, studies)
    shutil.rmtree(out_dir / DONE_DIR, ignore_errors=True)
    (out_dir / PLAN_FILE).unlink(missing_ok=True)
    return manifest
