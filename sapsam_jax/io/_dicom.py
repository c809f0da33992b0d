"""DICOM CT: a series folder (one slice per file) or one multi-frame (Enhanced CT) file.

Files are parsed in a thread pool (file reads and NumPy copies release the GIL), grouped by
SeriesInstanceUID, sorted by position along the slice normal, checked for duplicate and missing
slices, rescaled to HU and handed to :func:`to_canonical`. Patient-identifying attributes are
never copied out of the pydicom datasets, which are dropped once the volume is built.
"""

from __future__ import annotations

import math
import unicodedata
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from ._volume import CTLoadError, CTVolume, spacing_of, to_canonical, to_hu_int16

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
# Two slices closer than this along the normal are the same slice acquired twice.
DUPLICATE_TOLERANCE_MM = 0.01
# A slice step may differ from the series' usual step by this much (DICOM positions are decimal
# strings, rounded by scanners and converters) before it counts as a gap or uneven spacing:
# 0.05 mm or 2 %, far below any CT voxel, so rounding to 0.01 mm never trips it.
SPACING_TOLERANCE_MM = 0.05
SPACING_TOLERANCE_FRACTION = 0.02
# A gap within this fraction of a whole number of steps is reported as missing slices.
MISSING_SLICE_TOLERANCE = 0.1
# Slices of one series must share their orientation to this precision (direction cosines).
ORIENTATION_TOLERANCE = 1e-4
_MAX_LISTED = 5  # problems listed in one error message
# Header values longer than this (DICOM's LO limit), or holding control bytes, are not quoted in
# messages or kept in ct.meta (_shown, _plain_text).
_MAX_SHOWN_CHARS = 64
# Uncompressed transfer syntaxes whose pixel bytes are plain little-endian arrays (a deflated
# file is inflated by dcmread, so its PixelData is plain too).
_NATIVE_LITTLE_ENDIAN = frozenset(
    {ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
)
_HU_MIN, _HU_MAX = int(np.iinfo(np.int16).min), int(np.iinfo(np.int16).max)
# The top-level attributes this module reads. dcmread converts a value only when it is first
# read, so a damaged element (an unknown VR) would otherwise fail later, far from its file's name.
_USED_KEYWORDS = (
    "SOPClassUID", "Modality", "ImageType", "StudyInstanceUID", "SeriesInstanceUID",
    "SeriesDescription", "Manufacturer", "ManufacturerModelName", "ConvolutionKernel",
    "SliceThickness", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
    "RescaleSlope", "RescaleIntercept", "NumberOfFrames", "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence", "Rows", "Columns", "SamplesPerPixel", "BitsAllocated",
    "BitsStored", "PixelRepresentation", "PixelData",
)  # fmt: skip


@dataclass
class _Frame:
    """Geometry and rescale of one 2-D slice: a whole file, or one frame of a multi-frame file."""

    path: Path
    number: int | None  # frame index inside a multi-frame file
    position: np.ndarray  # ImagePositionPatient, LPS mm
    orientation: np.ndarray  # ImageOrientationPatient: row direction, then column direction
    pixel_spacing: np.ndarray  # (between rows, between columns) mm
    slope: float
    intercept: float

    def label(self) -> str:
        return self.path.name if self.number is None else f"{self.path.name} frame {self.number}"


def is_dicom_file(path: Path) -> bool:
    """True for a file with the DICOM Part 10 'DICM' marker after its 128-byte preamble."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def read_dicom(path: Path, series_uid: str | None, allow_gaps: bool) -> CTVolume:
    """Read a DICOM series folder or a single multi-frame DICOM file as a canonical CTVolume."""
    # pydicom's value checks warn and log the raw value, which in a damaged header can run on
    # over the patient's name, id and birth date (see _shown); our own checks name the file and
    # problem without it. (pydicom's switch is process-wide; it is restored when the read ends.)
    # One pool for parsing and decoding: starting threads twice costs more than a small series.
    with pydicom.config.disable_value_validation(), ThreadPoolExecutor() as pool:
        items = _read_folder(path, pool) if path.is_dir() else _read_single_file(path)
        items = _choose_series(items, series_uid, path)
        _check_modality(items, path)
        frames, decode = _frames_and_decoder(items, path)
        _check_consistent(frames, items, path)
        normal = _slice_normal(frames[0])
        frames.sort(key=lambda fr: float(fr.position @ normal))
        positions = np.array([fr.position @ normal for fr in frames])
        stack = _stack_direction(frames, normal)
        _check_stacked(frames, normal, stack, path)
        targets = _check_spacing(positions, frames, path, allow_gaps)
        hu = decode(frames, pool)
        interpolated = 0
        if targets is not None:
            interpolated = _count_new(positions, targets)
            hu, positions = _interpolate_slices(hu, positions, targets), targets
        hu, affine = to_canonical(hu, _native_affine(frames[0], normal, stack, positions), path)
        meta = _metadata(items[0][1], path, hu, affine, len(frames))  # reads values too
    meta["interpolated_slices"] = interpolated
    return CTVolume(hu=hu, spacing=spacing_of(affine), affine=affine, meta=meta)


# ----------------------------------------------------------------------------- reading files


def _read_one(path: Path):
    """The dataset of an image DICOM file; None for non-DICOM or non-image files (skipped)."""
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        return None
    except MemoryError:
        raise  # not the file's fault
    except Exception as err:  # pydicom raises many types on damaged headers
        raise CTLoadError(
            f"{path}: cannot parse DICOM, file truncated or corrupt ({err})"
        ) from None
    try:
        for keyword in _USED_KEYWORDS:
            ds.get(keyword)
    except MemoryError:
        raise
    except Exception as err:
        if "PixelData" not in ds:  # tested without converting it
            return None  # a damaged non-image object (dose report, ...): in no volume anyway
        raise CTLoadError(
            f"{path}: cannot parse DICOM, file truncated or corrupt ({err})"
        ) from None
    if not ds.get("PixelData"):  # absent, or of length 0
        if _is_image(ds):
            raise CTLoadError(f"{path}: DICOM image without pixel data, file truncated or corrupt")
        return None  # e.g. DICOMDIR, dose reports, presentation states, private reports
    return ds


def _is_image(ds) -> bool:
    """Whether a file without pixel data should have had some (truncated), by its SOP class.

    A private or unknown SOP class (Siemens CSA reports, Philips private series data) is an
    image only if it has the image attributes Rows and Columns: these precede PixelData, so a
    truncated image keeps them, while a non-image object never has them.
    """
    uid = ds.get("SOPClassUID") or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID")
    # A damaged header can hold several values here (a MultiValue, without a UID's name): then
    # the image attributes decide, as for an unknown class.
    if isinstance(uid, UID) and uid.is_valid and uid.name != uid:
        return "Image" in uid.name
    return "Rows" in ds and "Columns" in ds


def _read_folder(folder: Path, pool: ThreadPoolExecutor) -> list[tuple[Path, pydicom.Dataset]]:
    """Parse every DICOM image file directly inside ``folder``, in parallel threads."""
    entries = sorted(folder.iterdir())
    files = [p for p in entries if p.is_file() and not p.name.startswith(".")]
    if not files:
        subfolders = sum(p.is_dir() for p in entries)
        hint = f" (it has {subfolders} subfolder(s); pass a series folder)" if subfolders else ""
        raise CTLoadError(f"{folder}: empty folder, no files to read{hint}")
    datasets = list(pool.map(_read_one, files))
    images = [(p, ds) for p, ds in zip(files, datasets, strict=True) if ds is not None]
    # Scout images (ImageType LOCALIZER) share the folder, often the series, of the CT they plan:
    # a projection at another orientation, never a slice of the volume.
    items = [(p, ds) for p, ds in images if not _is_localizer(ds)]
    if not items:
        scouts = f" ({len(images)} localizer image(s) only)" if images else ""
        raise CTLoadError(
            f"{folder}: no DICOM image files among its {len(files)} file(s){scouts} "
            f"(files need the DICOM 'DICM' marker; NIfTI must be passed as a file)"
        )
    return items


def _is_localizer(ds) -> bool:
    image_type = ds.get("ImageType") or []
    values = [image_type] if isinstance(image_type, str) else list(image_type)
    return any(str(v).strip().upper() == "LOCALIZER" for v in values)


def _read_single_file(path: Path) -> list[tuple[Path, pydicom.Dataset]]:
    """A single DICOM file: a multi-frame volume, or a 2-D slice (refused with a hint)."""
    ds = _read_one(path)
    if ds is None:
        raise CTLoadError(f"{path}: not a DICOM image file")
    if _frame_count(ds, path) < 2:
        raise CTLoadError(
            f"{path}: a single 2-D image, not a CT volume; pass the folder holding its series"
        )
    return [(path, ds)]


# ----------------------------------------------------------------------------- series checks


def _choose_series(items, series_uid: str | None, source: Path):
    """Files of one series: the only one present, or the one named by ``series_uid``."""
    groups: dict[str, list] = {}
    for path, ds in items:
        groups.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
    if series_uid is not None:
        if series_uid not in groups:
            raise CTLoadError(
                f"{source}: no series {series_uid!r}; found:\n{_describe_series(groups)}"
            )
        return groups[series_uid]
    if len(groups) > 1:
        raise CTLoadError(
            f"{source}: {len(groups)} series found, choose one with series_uid=...:\n"
            f"{_describe_series(groups)}"
        )
    return next(iter(groups.values()))


def _describe_series(groups) -> str:
    """One line per series: UID, slice count, SeriesDescription (nothing about the patient)."""
    lines = []
    for uid, members in groups.items():
        ds = members[0][1]
        frames = sum(_frame_count(d, p) for p, d in members)
        desc = str(ds.get("SeriesDescription", "") or "")
        lines.append(f"  {uid or '(no SeriesInstanceUID)'}: {frames} slice(s), {_shown(desc)}")
    return "\n".join(lines)


def _check_modality(items, source: Path) -> None:
    """Refuse anything but CT (an MR or PET series in HU units would be nonsense)."""
    bad = [(p, ds.get("Modality")) for p, ds in items if ds.get("Modality") != "CT"]
    if bad:
        path, modality = bad[0]
        raise CTLoadError(
            f"{source}: Modality is {_shown(modality)}, not 'CT', in {len(bad)} file(s), "
            f"e.g. {path.name}"
        )


def _check_consistent(frames: list[_Frame], items, source: Path) -> None:
    """All slices must share orientation, pixel spacing and matrix size to form one volume."""
    if len(frames) < 2:
        raise CTLoadError(f"{source}: only one slice, a 2-D image rather than a CT volume")
    first = frames[0]
    orientations = np.array([fr.orientation for fr in frames])
    turned = np.flatnonzero(
        np.abs(orientations - first.orientation).max(axis=1) > ORIENTATION_TOLERANCE
    )
    if turned.size:
        other = frames[turned[0]]
        raise CTLoadError(
            f"{source}: slices have different orientations ({first.label()}: "
            f"{first.orientation.tolist()}, {other.label()}: {other.orientation.tolist()}); "
            "a localizer mixed into the series?"
        )
    spacings = np.array([fr.pixel_spacing for fr in frames])
    odd = np.flatnonzero(np.abs(spacings - first.pixel_spacing).max(axis=1) > 1e-4)
    if odd.size:
        raise CTLoadError(f"{source}: {frames[odd[0]].label()} has a different PixelSpacing")
    shapes = {_size(ds, path) for path, ds in items}
    if len(shapes) > 1:
        raise CTLoadError(f"{source}: slices have different sizes (rows, columns) {sorted(shapes)}")


def _stack_direction(frames: list[_Frame], normal: np.ndarray) -> np.ndarray:
    """The step from slice origin to slice origin per mm along the slice normal (sorted frames).

    The normal itself for an orthogonal stack. With a gantry tilt the slice planes lean while
    the table moves along the patient's axis, so the origins step off the normal: the grid is
    sheared, and the affine must be too, or every slice but the first is misplaced (by 2 mm at
    the end of a 25 cm scan tilted 0.5 degrees). ``to_canonical`` refuses a shear over 1 degree.
    """
    step = frames[-1].position - frames[0].position
    along = float(step @ normal)
    if len(frames) < 2 or along < 1e-6:
        return normal  # one slice, or duplicates (_check_spacing names them)
    return step / along


def _check_stacked(
    frames: list[_Frame], normal: np.ndarray, stack: np.ndarray, source: Path
) -> None:
    """Every slice origin on the line from the first one along ``stack``.

    The affine steps from slice to slice along ``stack`` (first to last origin); slices shifted
    off that line (another acquisition mixed in, a stack bent in ImagePositionPatient) would
    load with the wrong geometry and no error.
    """
    origins = np.array([fr.position for fr in frames])
    expected = origins[0] + np.outer((origins - origins[0]) @ normal, stack)
    shift = np.linalg.norm(origins - expected, axis=1)
    worst = int(np.argmax(shift))
    if shift[worst] > 0.5 * min(frames[0].pixel_spacing):
        raise CTLoadError(
            f"{source}: {frames[worst].label()} lies {shift[worst]:.1f} mm off the line of slice "
            f"origins from {frames[0].label()} to {frames[-1].label()}: slices of another "
            "acquisition, or a stack whose ImagePositionPatient does not run straight; resample "
            "the series onto a regular grid first"
        )


def _check_spacing(positions, frames: list[_Frame], source: Path, allow_gaps: bool):
    """None when slices are evenly spaced; else the regular positions to interpolate onto.

    Duplicates are always an error. Gaps and uneven steps are an error unless ``allow_gaps``.
    """
    steps = np.diff(positions)
    dup = np.flatnonzero(steps < DUPLICATE_TOLERANCE_MM)
    if dup.size:
        a, b = frames[dup[0]], frames[dup[0] + 1]
        raise CTLoadError(
            f"{source}: duplicate slice position {positions[dup[0]]:.2f} mm along the slice "
            f"normal in {a.label()} and {b.label()} ({dup.size} duplicate(s))"
        )
    step = float(np.median(steps))
    tolerance = max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_FRACTION * step)
    bad = np.flatnonzero(np.abs(steps - step) > tolerance)
    if bad.size == 0:
        return None
    problems = [_describe_gap(positions, frames, n, step) for n in bad[:_MAX_LISTED]]
    more = f"\n  ... and {bad.size - _MAX_LISTED} more" if bad.size > _MAX_LISTED else ""
    message = f"{source}: slices are not evenly spaced (usual step {step:.3f} mm):\n  " + (
        "\n  ".join(problems) + more
    )
    if not allow_gaps:
        raise CTLoadError(
            message + ";\npass allow_gaps=True (manifest column allow_gaps: 1) to interpolate "
            "across them"
        )
    count = max(int(round((positions[-1] - positions[0]) / step)), 1) + 1
    # stacklevel 4: _check_spacing <- read_dicom <- load_ct <- the caller's line.
    warnings.warn(message + f"\ninterpolating linearly onto {count} even slices", stacklevel=4)
    return np.linspace(positions[0], positions[-1], count)


def _describe_gap(positions, frames: list[_Frame], n: int, step: float) -> str:
    """'N missing slice(s) between ...' or 'uneven step ...' for the step after slice n."""
    gap = positions[n + 1] - positions[n]
    where = (
        f"between {positions[n]:.2f} mm ({frames[n].label()}) and "
        f"{positions[n + 1]:.2f} mm ({frames[n + 1].label()})"
    )
    multiple = gap / step
    if round(multiple) >= 2 and abs(multiple - round(multiple)) < MISSING_SLICE_TOLERANCE:
        return f"{round(multiple) - 1} missing slice(s) {where}"
    return f"uneven step of {gap:.3f} mm {where}"


# ----------------------------------------------------------------------------- geometry


def _frames_and_decoder(items, source: Path):
    """Slice records and a function that decodes them (in the given order) to int16 HU."""
    if len(items) == 1 and _frame_count(items[0][1], items[0][0]) > 1:
        path, ds = items[0]
        return _multiframe_frames(path, ds), lambda frames, _: _decode_multiframe(ds, path, frames)
    multi = [p.name for p, ds in items if _frame_count(ds, p) > 1]
    if multi:
        raise CTLoadError(f"{source}: several multi-frame files in one series ({multi[:3]})")
    frames = [_single_frame(path, ds) for path, ds in items]
    by_path = dict(items)
    return frames, lambda ordered, pool: _decode_series(ordered, by_path, pool)


def _floats(value, count: int, what: str, where) -> np.ndarray:
    """A numeric DICOM multi-value as a float array, or a clear error when absent/malformed."""
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        out = np.zeros(0)
    if out.shape != (count,):
        raise CTLoadError(f"{where}: missing or malformed {what} ({_shown(value)})")
    return out


def _number(value, what: str, where, default: float) -> float:
    """A numeric DICOM value (``default`` when absent), or a clear error naming the file."""
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        raise CTLoadError(f"{where}: malformed {what} ({_shown(value)})") from None


def _shown(value) -> str:
    """``repr(value)`` of a header value for a message, or only its length when it is not short
    plain text. A damaged length field makes a value run on over the elements after it: after
    Modality and SeriesDescription (group 0008) come the patient's name, id, birth date and
    address (group 0010), which must not reach messages, logs or failures.csv. The tags of the
    elements run over are binary (0x10 0x00), so such a value always holds control bytes."""
    text = str(value)
    if _plain_text(text):
        return repr(value)
    if _has_control_bytes(text):
        return f"<{len(text)} characters with control bytes, not shown: a damaged header?>"
    return f"<{len(text)} characters, not shown>"


def _plain_text(text: str) -> bool:
    """Short text without control bytes (any script, full-width and no-break spaces included)."""
    return len(text) <= _MAX_SHOWN_CHARS and not _has_control_bytes(text)


def _has_control_bytes(text: str) -> bool:
    return any(unicodedata.category(c) == "Cc" for c in text)


def _optional_number(value) -> float | None:
    """A descriptive number (not used for geometry or HU); None when absent or malformed (some
    converters write decimal commas), rather than failing the scan over it."""
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _frame_count(ds, where) -> int:
    """NumberOfFrames (1 when absent or 0), or a clear error naming the file."""
    value = ds.get("NumberOfFrames")
    count = _number(value, "NumberOfFrames", where, 1)
    if not math.isfinite(count):  # "nan" passes float() and is kept as text by pydicom
        raise CTLoadError(f"{where}: malformed NumberOfFrames ({_shown(value)})")
    return int(count or 1)


def _size(ds, where) -> tuple[int, int]:
    """(Rows, Columns) of an image, or a clear error naming the file."""
    if "Rows" not in ds or "Columns" not in ds:
        raise CTLoadError(f"{where}: no Rows/Columns: not an image")
    return int(_number(ds.Rows, "Rows", where, 0)), int(_number(ds.Columns, "Columns", where, 0))


def _single_frame(path: Path, ds) -> _Frame:
    return _Frame(
        path=path,
        number=None,
        position=_floats(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient", path),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", path),
        pixel_spacing=_floats(ds.get("PixelSpacing"), 2, "PixelSpacing", path),
        slope=_number(ds.get("RescaleSlope"), "RescaleSlope", path, 1.0),
        intercept=_number(ds.get("RescaleIntercept"), "RescaleIntercept", path, 0.0),
    )


def _functional(ds, per_frame, sequence: str, attribute: str):
    """``attribute`` of an Enhanced functional group: the frame's own, else the shared one."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    for group in (per_frame, shared[0] if shared else None):
        items = group.get(sequence) if group is not None else None
        if items and attribute in items[0]:
            return items[0].get(attribute)
    return ds.get(attribute)  # legacy multi-frame files keep them at the top level


def _multiframe_frames(path: Path, ds) -> list[_Frame]:
    """One record per frame of an Enhanced (multi-frame) CT file, from its functional groups."""
    count = int(ds.NumberOfFrames)
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence", [])) or [None] * count
    if len(per_frame) != count:
        raise CTLoadError(f"{path}: {len(per_frame)} per-frame groups for {count} frames")
    try:
        return [_enhanced_frame(path, ds, n, group) for n, group in enumerate(per_frame)]
    except CTLoadError:
        raise
    except Exception as err:  # values in the groups are converted when first read (_read_one)
        raise CTLoadError(
            f"{path}: cannot parse DICOM, file truncated or corrupt ({err})"
        ) from None


def _enhanced_frame(path: Path, ds, number: int, group) -> _Frame:
    where = f"{path} frame {number}"
    position = _functional(ds, group, "PlanePositionSequence", "ImagePositionPatient")
    orientation = _functional(ds, group, "PlaneOrientationSequence", "ImageOrientationPatient")
    spacing = _functional(ds, group, "PixelMeasuresSequence", "PixelSpacing")
    slope = _functional(ds, group, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _functional(ds, group, "PixelValueTransformationSequence", "RescaleIntercept")
    return _Frame(
        path=path,
        number=number,
        position=_floats(position, 3, "ImagePositionPatient", where),
        orientation=_floats(orientation, 6, "ImageOrientationPatient", where),
        pixel_spacing=_floats(spacing, 2, "PixelSpacing", where),
        slope=_number(slope, "RescaleSlope", where, 1.0),
        intercept=_number(intercept, "RescaleIntercept", where, 0.0),
    )


def _slice_normal(frame: _Frame) -> np.ndarray:
    """Unit normal of the slice plane: row direction x column direction."""
    normal = np.cross(frame.orientation[:3], frame.orientation[3:])
    norm = np.linalg.norm(normal)
    if norm < 0.5:
        raise CTLoadError(f"{frame.label()}: degenerate ImageOrientationPatient")
    return normal / norm


def _native_affine(
    first: _Frame, normal: np.ndarray, stack: np.ndarray, positions: np.ndarray
) -> np.ndarray:
    """4x4 from (slice, row, column) indices of the sorted stack to LPS mm.

    A row index steps along the column direction cosine (IOP[3:]) by PixelSpacing[0]; a column
    index along the row direction cosine (IOP[:3]) by PixelSpacing[1] (DICOM PS3.3 C.7.6.2.1.1);
    a slice index along ``stack`` (per mm of ``positions``, along the normal; sheared by a tilt).
    """
    affine = np.eye(4)
    affine[:3, 0] = stack * (positions[-1] - positions[0]) / (len(positions) - 1)
    affine[:3, 1] = first.orientation[3:] * first.pixel_spacing[0]
    affine[:3, 2] = first.orientation[:3] * first.pixel_spacing[1]
    # The first slice's origin, moved onto the first (possibly interpolated) position.
    affine[:3, 3] = first.position + stack * (positions[0] - first.position @ normal)
    return affine


# ----------------------------------------------------------------------------- pixels


def _pixels(ds, path: Path) -> np.ndarray:
    """Stored pixel values, with pydicom's failures turned into messages that say what to do."""
    try:
        native = _native_pixels(ds)
        return native if native is not None else ds.pixel_array
    except (RuntimeError, NotImplementedError) as err:
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown")
        raise CTLoadError(
            f"{path}: cannot decode {getattr(syntax, 'name', syntax)} pixel data: "
            f"{_missing_plugins(syntax) or err}"
        ) from None
    except MemoryError:
        raise  # not the file's fault
    except Exception as err:  # damaged pixel attributes (a list for BitsAllocated, ...)
        raise CTLoadError(f"{path}: pixel data truncated or corrupt ({err})") from None


def _native_pixels(ds) -> np.ndarray | None:
    """Uncompressed 16-bit little-endian slices straight from the bytes; None for anything else.

    pydicom's general ``pixel_array`` costs ~2 ms per 512x512 slice, more than parsing the file;
    this path does what it does for the common CT layout (mask the bits above BitsStored, or
    sign-extend from them) in ~0.05 ms. Everything unusual goes through pydicom.
    """
    syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    if (
        syntax not in _NATIVE_LITTLE_ENDIAN
        or ds.get("BitsAllocated") != 16
        or ds.get("SamplesPerPixel", 1) != 1
        or int(ds.get("NumberOfFrames", 1) or 1) != 1
    ):
        return None
    rows, columns, bits = int(ds.Rows), int(ds.Columns), int(ds.get("BitsStored", 16))
    data = ds.PixelData
    if len(data) < rows * columns * 2 or not 1 <= bits <= 16:
        return None  # pydicom explains what is wrong
    signed = ds.get("PixelRepresentation", 0) == 1
    raw = np.frombuffer(data, "<i2" if signed else "<u2", count=rows * columns)
    raw = raw.reshape(rows, columns)
    if bits < 16 and signed:
        return (raw << (16 - bits)) >> (16 - bits)  # arithmetic shift sign-extends
    if bits < 16:
        return raw & np.uint16((1 << bits) - 1)  # bits above BitsStored may hold overlays
    return raw


def _missing_plugins(syntax) -> str:
    """Which packages would let pydicom decode ``syntax`` (empty when pydicom cannot say)."""
    try:
        from pydicom.pixels import get_decoder

        missing = get_decoder(syntax).missing_dependencies
    except Exception:  # unknown syntax, or an older pydicom without pydicom.pixels
        return ""
    if not missing:
        return ""
    return (
        "no pixel-data plugin installed for it; install one of: "
        + "; ".join(missing)
        + " (pip names: python-gdcm, pylibjpeg + pylibjpeg-libjpeg/-openjpeg/-rle, pyjpegls)"
    )


def _rescale_into(out: np.ndarray, raw: np.ndarray, slope: float, intercept: float) -> None:
    """Stored values -> int16 HU written into ``out``.

    The usual CT rescale is an integer shift (slope 1, intercept -1024); when the shifted range
    fits int16 it is one NumPy pass with no temporaries, otherwise round and clip.
    """
    if slope == 1 and float(intercept).is_integer() and raw.dtype in (np.int16, np.uint16):
        shift, low, high = int(intercept), int(raw.min()), int(raw.max())
        if _HU_MIN <= low + shift and high + shift <= _HU_MAX and high <= _HU_MAX:
            # Stored values and results both fit int16: one int16 pass, no casting buffers.
            np.add(raw.view(np.int16), np.int16(shift), out=out)
            return
    out[...] = to_hu_int16(raw.astype(np.float64) * slope + intercept)


def _decode_series(frames: list[_Frame], by_path, pool: ThreadPoolExecutor) -> np.ndarray:
    """Decode one file per slice, in parallel, straight into the int16 stack."""
    first = by_path[frames[0].path]
    hu = np.empty((len(frames), *_size(first, frames[0].path)), dtype=np.int16)

    def fill(n: int) -> None:
        fr = frames[n]
        _rescale_into(hu[n], _pixels(by_path[fr.path], fr.path), fr.slope, fr.intercept)

    list(pool.map(fill, range(len(frames))))
    return hu


def _decode_multiframe(ds, path: Path, frames: list[_Frame]) -> np.ndarray:
    """Decode all frames of one file, then reorder and rescale them."""
    pixels = _pixels(ds, path)
    hu = np.empty((len(frames),) + pixels.shape[1:], dtype=np.int16)
    for n, fr in enumerate(frames):
        _rescale_into(hu[n], pixels[fr.number], fr.slope, fr.intercept)
    return hu


def _count_new(positions, targets) -> int:
    """How many output slices lie at no measured position (for ``meta``)."""
    nearest = np.abs(targets[:, None] - positions[None, :]).min(axis=1)
    return int(np.count_nonzero(nearest > DUPLICATE_TOLERANCE_MM))


def _interpolate_slices(hu: np.ndarray, positions, targets) -> np.ndarray:
    """Linear interpolation along k from the measured slice positions onto ``targets``."""
    upper = np.clip(np.searchsorted(positions, targets, side="right"), 1, len(positions) - 1)
    lower = upper - 1
    weight = (targets - positions[lower]) / (positions[upper] - positions[lower])
    out = np.empty((len(targets),) + hu.shape[1:], dtype=hu.dtype)
    for n, (lo, hi, w) in enumerate(zip(lower, upper, weight, strict=True)):
        below, above = hu[lo].astype(np.float32), hu[hi].astype(np.float32)
        out[n] = to_hu_int16(below + np.float32(w) * (above - below))
    return out


# ----------------------------------------------------------------------------- metadata


def _text(ds, keyword: str) -> str | None:
    """A descriptive attribute as text (multi-valued ones joined with backslashes), or None; None
    too for a value that is not short plain text, which ran on over the patient module (_shown)."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    text = "\\".join(str(v) for v in value) if isinstance(value, MultiValue) else str(value)
    return text if _plain_text(text) else None


def _metadata(ds, source: Path, hu, affine, frame_count: int) -> dict:
    """The allowed description of the scan: an explicit allow-list, nothing about the patient."""
    return {
        "format": "dicom",
        "source_path": str(source),
        "study_uid": _text(ds, "StudyInstanceUID"),
        "series_uid": _text(ds, "SeriesInstanceUID"),
        "series_description": _text(ds, "SeriesDescription"),
        "manufacturer": _text(ds, "Manufacturer"),
        "scanner_model": _text(ds, "ManufacturerModelName"),
        "convolution_kernel": _text(ds, "ConvolutionKernel"),
        "slice_thickness_mm": _optional_number(ds.get("SliceThickness")),
        "spacing": spacing_of(affine),
        "shape": tuple(hu.shape),
        "slice_count": frame_count,
    }
