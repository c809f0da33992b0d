"""The cohort manifest: one CSV row per CT study with its labels (docs/ARCHITECTURE.md).

Columns, in order: ``study_id, patient_id, path, cpa, survival_2y``, the 24 annotation columns
``{side}_{level}_{flag}`` (``config.SUBREGIONS`` x ``config.ANNOTATION_FLAGS``, paper 1.2 /
Table 1), then optional ``lesion_labels``, ``series_uid`` and ``allow_gaps``. Labels are 0/1; an
empty cell means "not known / not annotated" (the paper's annotations are sparse). Relative paths
resolve against the folder that holds the manifest. Reading reports every problem at once, with
row and column.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import MappingProxyType

from ..config import ANNOTATION_FLAGS, SUBREGIONS
from ._volume import atomic_path

REQUIRED_COLUMNS = ("study_id", "patient_id", "path", "cpa", "survival_2y")
ANNOTATION_COLUMNS = tuple(f"{region}_{flag}" for region in SUBREGIONS for flag in ANNOTATION_FLAGS)
# series_uid / allow_gaps: which series of a DICOM folder holding several, and whether missing or
# unevenly spaced slices are interpolated (load_ct's arguments).
OPTIONAL_COLUMNS = ("lesion_labels", "series_uid", "allow_gaps")
# The ordered column list of a manifest; write_manifest writes exactly these.
manifest_columns: tuple[str, ...] = REQUIRED_COLUMNS + ANNOTATION_COLUMNS + OPTIONAL_COLUMNS
# Only these columns may be absent from a manifest's header.
_MAY_BE_ABSENT = frozenset(OPTIONAL_COLUMNS)
# Spreadsheets and pandas write a 0/1 column holding blanks as floats; accept those spellings.
_BINARY = {"0": 0, "1": 1, "0.0": 0, "1.0": 1}
# A study id names its cache directory (data.ProjectionCache): one safe path component.
STUDY_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
STUDY_ID_RULE = "letters, digits, '_', '-', '.'; not starting with '.'"


class ManifestError(ValueError):
    """A manifest that cannot be used; ``problems`` lists every one found, with row and column."""

    def __init__(self, path, problems: Sequence[str]):
        self.path = Path(path)
        self.problems = list(problems)
        if len(self.problems) == 1:  # e.g. "manifest file not found": one line
            super().__init__(f"{self.path}: {self.problems[0]}")
            return
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{self.path}: {len(self.problems)} problems in the manifest:\n{lines}")


def _empty_annotations() -> dict[str, dict[str, int | None]]:
    return {region: dict.fromkeys(ANNOTATION_FLAGS) for region in SUBREGIONS}


def _frozen_annotations(annotations: Mapping) -> Mapping[str, Mapping[str, int | None]]:
    """Every sub-region x flag filled in (missing = None), validated, read-only."""
    full = _empty_annotations()
    for region, flags in annotations.items():
        if region not in full:
            raise ValueError(f"unknown sub-region {region!r}; expected one of {SUBREGIONS}")
        for flag, value in flags.items():
            if flag not in ANNOTATION_FLAGS:
                raise ValueError(f"unknown flag {flag!r}; expected one of {ANNOTATION_FLAGS}")
            if value not in (0, 1, None):
                raise ValueError(f"{region}_{flag} must be 0, 1 or None, not {value!r}")
            full[region][flag] = None if value is None else int(value)
    return MappingProxyType({r: MappingProxyType(f) for r, f in full.items()})


@dataclass(frozen=True)
class Study:
    """One CT study of the cohort and its labels.

    ``annotations[subregion][flag]`` is 0/1, or None where not annotated; sub-regions are
    ``config.SUBREGIONS`` and flags ``config.ANNOTATION_FLAGS`` (paper 1.2). Missing entries of
    a partial ``annotations`` mapping are filled with None.
    """

    study_id: str
    patient_id: str
    path: Path
    cpa: int
    survival_2y: int | None = None
    annotations: Mapping[str, Mapping[str, int | None]] = field(default_factory=dict)
    lesion_labels: Path | None = None
    series_uid: str | None = None
    allow_gaps: bool = False

    def __post_init__(self):
        if self.cpa not in (0, 1) or self.survival_2y not in (0, 1, None):
            raise ValueError(f"study {self.study_id!r}: cpa must be 0/1, survival_2y 0/1/None")
        # Frozen dataclass: normalise fields once, here, through object.__setattr__.
        object.__setattr__(self, "cpa", int(self.cpa))
        if self.survival_2y is not None:
            object.__setattr__(self, "survival_2y", int(self.survival_2y))
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "annotations", _frozen_annotations(self.annotations))
        if self.lesion_labels is not None:
            object.__setattr__(self, "lesion_labels", Path(self.lesion_labels))
        object.__setattr__(self, "series_uid", self.series_uid or None)
        object.__setattr__(self, "allow_gaps", bool(self.allow_gaps))

    def __hash__(self) -> int:  # annotations is a (unhashable) mapping; identity is enough
        return hash((self.study_id, self.path))

    @property
    def is_annotated(self) -> bool:
        """True when at least one sub-region flag is labelled."""
        return any(v is not None for flags in self.annotations.values() for v in flags.values())


@dataclass(frozen=True)
class Manifest(Sequence):
    """The studies of a manifest, in file order; index by position or look up by study_id."""

    studies: tuple[Study, ...]
    path: Path | None = None

    def __getitem__(self, index):
        return self.studies[index]

    def __len__(self) -> int:
        return len(self.studies)

    @cached_property
    def _by_id(self) -> dict[str, Study]:
        return {s.study_id: s for s in self.studies}

    def by_id(self, study_id: str) -> Study:
        return self._by_id[study_id]

    @property
    def study_ids(self) -> tuple[str, ...]:
        return tuple(s.study_id for s in self.studies)

    @property
    def patient_ids(self) -> tuple[str, ...]:
        """Distinct patients in first-seen order (splits must keep a patient on one side)."""
        return tuple(dict.fromkeys(s.patient_id for s in self.studies))


# ----------------------------------------------------------------------------- reading


def read_manifest(path: str | os.PathLike, *, check_files: bool = True) -> Manifest:
    """Read and validate a cohort manifest CSV.

    Raises :class:`ManifestError` listing every problem (unknown or missing column, bad value,
    duplicate study_id, missing CT or label file with ``check_files``), each with its row
    (file line, header = row 1) and column.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ManifestError(path, ["manifest file not found"])
    header, rows = _read_csv(path)
    separator = _other_separator(header)
    if separator:
        raise ManifestError(
            path,
            [
                f"row 1: columns separated by {separator!r}, not commas (a spreadsheet export "
                "with another list separator?); save the manifest comma-separated"
            ],
        )
    problems = _header_problems(header) + _duplicate_ids(header, rows)
    if not rows:
        problems.append("no study rows after the header")
    root = path.parent.resolve()
    studies = [_parse_row(n, header, cells, root, check_files, problems) for n, cells in rows]
    if problems:
        # Reported in file order, whatever check found them.
        raise ManifestError(path, sorted(problems, key=_row_of))
    return Manifest(tuple(studies), path.resolve())


def _row_of(problem: str) -> int:
    """Row number a problem message starts with ("row 12, ..."); problems without one go last."""
    words = problem.split(maxsplit=2)
    return int(words[1].rstrip(":,")) if words[0] == "row" else 1 << 30


def _duplicate_ids(header: list[str], rows) -> list[str]:
    """Every repeat of a study_id, pointing at its first row (checked even on faulty rows).

    Ids that differ only in case are repeats too: they would share one cache directory on a
    case-insensitive file system (macOS, Windows).
    """
    if "study_id" not in header:
        return []
    column, first, problems = header.index("study_id"), {}, []
    for row_number, cells in rows:
        study_id = cells[column].strip() if column < len(cells) else ""
        key = study_id.casefold()
        if study_id and key in first:
            row, seen = first[key]
            also = "" if seen == study_id else f" as {seen!r}; ids must differ in more than case"
            problems.append(
                f"row {row_number}, column 'study_id': duplicate study_id {study_id!r} "
                f"(first on row {row}{also})"
            )
        first.setdefault(key, (row_number, study_id))
    return problems


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (row number, cells) of the non-blank rows; utf-8-sig drops an Excel BOM."""
    start, rows = 1, []  # rows are numbered by the line they start on (header = row 1)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [name.strip() for name in next(reader, [])]
            start = reader.line_num + 1
            for row in reader:
                if any(c.strip() for c in row):
                    rows.append((start, row))
                start = reader.line_num + 1
    except UnicodeDecodeError:
        raise ManifestError(path, [_not_utf8(Path(path).read_bytes())]) from None
    except csv.Error as err:  # e.g. an unbalanced quote swallowing the rest of the file
        raise ManifestError(
            path, [f"row {start}: unreadable CSV ({err}): an unbalanced '\"' in this row?"]
        ) from None
    if not header:
        raise ManifestError(path, ["empty file: no header row"])
    return header, rows


def _not_utf8(data: bytes) -> str:
    """Where a manifest stops being UTF-8 (Excel on Windows saves CSV as cp1252)."""
    try:
        data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        row = data[: err.start].count(b"\n") + 1
        return f"row {row}: not UTF-8 (byte 0x{data[err.start]:02x}); save the file as UTF-8 CSV"
    return "not UTF-8; save the file as UTF-8 CSV"


def _other_separator(header: list[str]) -> str | None:
    """';' or tab when the header is the manifest's columns joined by it instead of commas."""
    if len(header) != 1:
        return None
    for separator in (";", "\t"):
        names = [name.strip() for name in header[0].split(separator)]
        if len(names) > 1 and "study_id" in names:
            return separator
    return None


def _header_problems(header: list[str]) -> list[str]:
    """Unknown, repeated and missing columns, each named."""
    problems = []
    for n, name in enumerate(header, start=1):
        if name not in manifest_columns:
            problems.append(f"row 1, column {n}: unknown column {name!r}")
        elif header.index(name) != n - 1:
            problems.append(f"row 1, column {n}: column {name!r} repeated")
    for name in manifest_columns:
        if name not in header and name not in _MAY_BE_ABSENT:
            problems.append(f"row 1: missing required column {name!r}")
    return problems


def _parse_row(row_number, header, cells, root: Path, check_files, problems) -> Study | None:
    """One Study from a data row, or None after appending this row's problems."""
    if len(cells) != len(header):
        spans = any("\n" in cell or "\r" in cell for cell in cells)
        hint = ": a quoted field runs over several lines (an unbalanced '\"'?)" if spans else ""
        problems.append(
            f"row {row_number}: {len(cells)} fields, the header has {len(header)}{hint}"
        )
        return None
    values = {name: cell.strip() for name, cell in zip(header, cells, strict=True)}
    before = len(problems)

    def bad(column: str, message: str) -> None:
        problems.append(f"row {row_number}, column {column!r}: {message}")

    for column in ("study_id", "patient_id"):
        if column in values and not values[column]:
            bad(column, "empty")
    study_id = values.get("study_id", "")
    if study_id and not STUDY_ID_PATTERN.match(study_id):
        bad("study_id", f"{study_id!r} cannot name a cache directory (use {STUDY_ID_RULE})")
    fields = {
        "cpa": _binary(values, "cpa", bad, optional=False),
        "survival_2y": _binary(values, "survival_2y", bad, optional=True),
        "path": _path(values, "path", root, check_files, bad, optional=False),
        "lesion_labels": _path(values, "lesion_labels", root, check_files, bad, optional=True),
        "series_uid": values.get("series_uid") or None,
        "allow_gaps": bool(_binary(values, "allow_gaps", bad, optional=True)),
    }
    annotations = _empty_annotations()
    for region in SUBREGIONS:
        for flag in ANNOTATION_FLAGS:
            annotations[region][flag] = _binary(values, f"{region}_{flag}", bad, optional=True)
    if len(problems) > before or not set(REQUIRED_COLUMNS) <= values.keys():
        return None
    return Study(values["study_id"], values["patient_id"], annotations=annotations, **fields)


def _binary(values, column, bad, *, optional: bool) -> int | None:
    """0/1 from a cell; None for an empty optional cell or an absent column."""
    text = values.get(column)
    if text is None or (optional and text == ""):
        return None
    if text not in _BINARY:
        bad(column, f"bad value {text!r} (expected 0 or 1{', or empty' if optional else ''})")
        return None
    return _BINARY[text]


def _path(values, column, root: Path, check_files, bad, *, optional: bool) -> Path | None:
    """Absolute path from a cell (relative to the manifest's folder), checked to exist."""
    text = values.get(column)
    if text is None or (optional and text == ""):
        return None
    if not text:
        bad(column, "empty, expected the path of a CT (DICOM folder or NIfTI file)")
        return None
    resolved = (root / Path(text).expanduser()).resolve()
    if check_files and not resolved.exists():
        bad(column, f"file not found: {resolved}")
    return resolved


# ----------------------------------------------------------------------------- writing


def _cell(value) -> str:
    return "" if value is None else str(value)


def _relative(path: Path | None, root: Path) -> str:
    """Path relative to the manifest's folder when inside it (a cohort folder can be moved).
    A relative ``path`` is taken from the current directory, as Python takes it."""
    if path is None:
        return ""
    absolute = Path(path).expanduser().resolve()
    try:
        return absolute.relative_to(root).as_posix()
    except ValueError:
        return absolute.as_posix()


def _row(study: Study, root: Path) -> list[str]:
    annotations = [
        _cell(study.annotations[region][flag]) for region in SUBREGIONS for flag in ANNOTATION_FLAGS
    ]
    return [
        study.study_id,
        study.patient_id,
        _relative(study.path, root),
        _cell(study.cpa),
        _cell(study.survival_2y),
        *annotations,
        _relative(study.lesion_labels, root),
        _cell(study.series_uid),
        "1" if study.allow_gaps else "",
    ]


def write_manifest(path: str | os.PathLike, studies: Iterable[Study]) -> Path:
    """Write ``studies`` as a manifest CSV with :data:`manifest_columns` (atomically).

    Paths (relative ones are taken from the current directory) inside the manifest's folder are
    written relative to it, others absolute.
    """
    path = Path(path).expanduser()
    root = path.parent.resolve()
    rows = [_row(study, root) for study in studies]
    duplicates = sorted(i for i, n in Counter(row[0] for row in rows).items() if n > 1)
    if duplicates:
        raise ValueError(f"{path}: duplicate study_id(s) {duplicates}")
    with atomic_path(path, suffix=".csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(manifest_columns)
            writer.writerows(rows)
    return path
