"""The cohort manifest: column contract, round trip, and reporting every problem at once."""

import csv

import pytest

from sapsam_jax.config import ANNOTATION_FLAGS, SUBREGIONS
from sapsam_jax.io import (
    Manifest,
    ManifestError,
    Study,
    manifest_columns,
    read_manifest,
    write_manifest,
)


@pytest.fixture
def cohort(tmp_path):
    """A cohort folder with three (empty) CT files, one label map and one CT outside it."""
    root = tmp_path / "cohort"
    (root / "ct").mkdir(parents=True)
    for name in ("s1.nii.gz", "s2.nii.gz", "s3.nii.gz", "s1_lesions.nii.gz"):
        (root / "ct" / name).write_bytes(b"")
    (tmp_path / "elsewhere.nii.gz").write_bytes(b"")
    return root


def studies(root):
    return [
        Study(
            "s1",
            "p1",
            root / "ct" / "s1.nii.gz",
            cpa=1,
            survival_2y=0,
            annotations={"left_upper": {"cavity": 1, "fungus_ball": 0}, "right_lower": {}},
            lesion_labels=root / "ct" / "s1_lesions.nii.gz",
        ),
        Study("s2", "p1", root / "ct" / "s2.nii.gz", cpa=1, series_uid="1.2.3.4", allow_gaps=True),
        Study("s3", "p2", root.parent / "elsewhere.nii.gz", cpa=0),
    ]


def test_column_contract():
    assert len(manifest_columns) == 5 + 24 + 3
    assert manifest_columns[:5] == ("study_id", "patient_id", "path", "cpa", "survival_2y")
    assert manifest_columns[5:9] == (
        "left_upper_preexisting",
        "left_upper_cavity",
        "left_upper_fungus_ball",
        "left_upper_pleural_thickening",
    )
    assert manifest_columns[-4] == "right_lower_pleural_thickening"
    assert manifest_columns[-3:] == ("lesion_labels", "series_uid", "allow_gaps")
    expected = {f"{r}_{f}" for r in SUBREGIONS for f in ANNOTATION_FLAGS}
    assert expected == set(manifest_columns[5:-3])


def test_round_trip(cohort):
    written = studies(cohort)
    path = write_manifest(cohort / "manifest.csv", written)
    assert sorted(p.name for p in cohort.iterdir()) == ["ct", "manifest.csv"]  # no temp left
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == manifest_columns
    assert rows[1][2] == "ct/s1.nii.gz" and rows[1][-3] == "ct/s1_lesions.nii.gz"  # relative
    assert rows[2][-2:] == ["1.2.3.4", "1"] and rows[1][-2:] == ["", ""]
    assert rows[3][2] == str(cohort.parent.resolve() / "elsewhere.nii.gz")  # outside: absolute
    assert rows[2][4] == "" and rows[1][manifest_columns.index("left_upper_cavity")] == "1"

    manifest = read_manifest(path)
    assert isinstance(manifest, Manifest) and len(manifest) == 3
    assert list(manifest) == written
    s1 = manifest.by_id("s1")
    assert s1.path.is_absolute() and s1.path == (cohort / "ct" / "s1.nii.gz").resolve()
    assert s1.annotations["left_upper"]["cavity"] == 1
    assert s1.annotations["left_upper"]["fungus_ball"] == 0
    assert s1.annotations["left_upper"]["preexisting"] is None
    assert s1.annotations["right_middle"]["cavity"] is None
    assert s1.is_annotated and not manifest[1].is_annotated
    assert manifest[1].survival_2y is None and manifest[2].cpa == 0
    assert (manifest[1].series_uid, manifest[1].allow_gaps) == ("1.2.3.4", True)
    assert (s1.series_uid, s1.allow_gaps) == (None, False)
    assert manifest.patient_ids == ("p1", "p2")
    assert manifest.study_ids == ("s1", "s2", "s3")


def test_relative_paths_resolve_against_the_manifest_folder(cohort, tmp_path, monkeypatch):
    write_manifest(cohort / "manifest.csv", studies(cohort)[:2])
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    manifest = read_manifest("../cohort/manifest.csv")
    assert manifest[1].path == (cohort / "ct" / "s2.nii.gz").resolve()


def test_study_is_frozen_and_validated(tmp_path):
    study = Study("s", "p", tmp_path, cpa=1)
    with pytest.raises(AttributeError):
        study.cpa = 0
    with pytest.raises(TypeError):
        study.annotations["left_upper"]["cavity"] = 1
    with pytest.raises(ValueError, match="unknown sub-region 'left_top'"):
        Study("s", "p", tmp_path, cpa=1, annotations={"left_top": {"cavity": 1}})
    with pytest.raises(ValueError, match="left_upper_cavity must be 0, 1 or None"):
        Study("s", "p", tmp_path, cpa=1, annotations={"left_upper": {"cavity": 2}})
    with pytest.raises(ValueError, match="cpa must be 0/1"):
        Study("s", "p", tmp_path, cpa=3)
    with pytest.raises(ValueError, match=r"duplicate study_id\(s\) \['s'\]"):
        write_manifest(tmp_path / "m.csv", [study, study])


def test_every_problem_is_reported_with_row_and_column(cohort):
    header = [c for c in manifest_columns if c not in ("survival_2y", "left_upper_cavity")]
    header.append("left_upper_cavty")  # a typo: unknown column, and the real one is missing
    blank = dict.fromkeys(header, "")

    def row(**values):
        return [{**blank, **values}[c] for c in header]

    rows = [
        row(study_id="s1", patient_id="p1", path="ct/s1.nii.gz", cpa="yes"),  # row 2
        row(study_id="s2", patient_id="p2", path="ct/gone.nii.gz", cpa="1", right_upper_cavity="2"),
        row(study_id="s1", patient_id="p3", path="ct/s3.nii.gz", cpa="0"),  # row 4: duplicate
        row(study_id="", patient_id="p4", path="ct/s3.nii.gz", cpa="1", lesion_labels="x.nii"),
        ["s6", "p6", "ct/s3.nii.gz"],  # row 6: too few fields
        row(study_id="s7", patient_id="p7", path="ct/s3.nii.gz", cpa="1.0"),  # fine (pandas)
    ]
    path = cohort / "bad.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    expected = [
        f"row 1, column {len(header)}: unknown column 'left_upper_cavty'",
        "row 1: missing required column 'survival_2y'",
        "row 1: missing required column 'left_upper_cavity'",
        "row 2, column 'cpa': bad value 'yes' (expected 0 or 1)",
        "row 3, column 'path': file not found: " + str((cohort / "ct" / "gone.nii.gz").resolve()),
        "row 3, column 'right_upper_cavity': bad value '2' (expected 0 or 1, or empty)",
        "row 4, column 'study_id': duplicate study_id 's1' (first on row 2)",
        "row 5, column 'study_id': empty",
        "row 5, column 'lesion_labels': file not found: " + str((cohort / "x.nii").resolve()),
        f"row 6: 3 fields, the header has {len(header)}",
    ]
    assert sorted(err.value.problems) == sorted(expected)
    rows_in_order = [int(p.split()[1].rstrip(":,")) for p in err.value.problems]
    assert rows_in_order == sorted(rows_in_order)  # reported in file order
    message = str(err.value)
    assert "10 problems in the manifest" in message and all(p in message for p in expected)
    assert isinstance(err.value, ValueError)


def test_ids_the_cache_cannot_use_and_unbalanced_quotes_are_named(cohort):
    def line(study_id, path="ct/s1.nii.gz"):
        return ",".join([study_id, "p1", path, "1"] + [""] * (len(manifest_columns) - 4))

    rows = [line("s1"), line("../s2"), line("S1"), line("p1 s3"), line(".hidden")]
    path = cohort / "ids.csv"
    path.write_text("\n".join([",".join(manifest_columns), *rows]) + "\n")
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    unusable = "cannot name a cache directory (use letters, digits, '_', '-', '.'; not starting"
    assert err.value.problems == [
        f"row 3, column 'study_id': '../s2' {unusable} with '.')",
        "row 4, column 'study_id': duplicate study_id 'S1' (first on row 2 as 's1'; ids must "
        "differ in more than case)",
        f"row 5, column 'study_id': 'p1 s3' {unusable} with '.')",
        f"row 6, column 'study_id': '.hidden' {unusable} with '.')",
    ]

    # A stray opening quote swallows the rows after it: named, with the row it starts on.
    rows = [line("s1"), line("s2", path='"ct/s2.nii.gz'), line("s3")]
    path.write_text("\n".join([",".join(manifest_columns), *rows]) + "\n")
    with pytest.raises(ManifestError, match=r"row 3: 3 fields, .*runs over several lines"):
        read_manifest(path)
    big = [line(f"s{n}") for n in range(4, 4000)]  # past csv's field size limit
    path.write_text("\n".join([",".join(manifest_columns), *rows, *big]) + "\n")
    with pytest.raises(ManifestError, match=r"row 3: unreadable CSV \(field larger than"):
        read_manifest(path)


def test_relative_study_paths_are_taken_from_the_current_directory(cohort, monkeypatch):
    monkeypatch.chdir(cohort)
    write_manifest(cohort / "sub" / "m.csv", [Study("s1", "p1", "ct/s1.nii.gz", cpa=1)])
    assert read_manifest(cohort / "sub" / "m.csv")[0].path == (cohort / "ct" / "s1.nii.gz")


def test_missing_files_can_be_left_unchecked(cohort):
    write_manifest(cohort / "m.csv", studies(cohort))
    (cohort / "ct" / "s2.nii.gz").unlink()
    with pytest.raises(ManifestError, match=r"row 3, column 'path': file not found"):
        read_manifest(cohort / "m.csv")
    assert len(read_manifest(cohort / "m.csv", check_files=False)) == 3


def test_missing_and_empty_manifests(tmp_path):
    with pytest.raises(ManifestError, match=r"none\.csv: manifest file not found$"):
        read_manifest(tmp_path / "none.csv")  # one problem: one line, no list
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ManifestError, match="empty file: no header row"):
        read_manifest(tmp_path / "empty.csv")
    (tmp_path / "header_only.csv").write_text(",".join(manifest_columns) + "\n")
    with pytest.raises(ManifestError, match="no study rows after the header"):
        read_manifest(tmp_path / "header_only.csv")
    # Saved by Excel on Windows (cp1252): the row and the byte, not a bare decoding error.
    row = ["Séverine_01", "P1", "scan.nii.gz", "1"] + [""] * (len(manifest_columns) - 4)
    text = ",".join(manifest_columns) + "\n" + ",".join(row) + "\n"
    (tmp_path / "cp1252.csv").write_bytes(text.encode("cp1252"))
    with pytest.raises(ManifestError, match=r"(?s)cp1252\.csv.*row 2: not UTF-8 \(byte 0xe9\)"):
        read_manifest(tmp_path / "cp1252.csv")


@pytest.mark.parametrize("separator", [";", "\t"])
def test_a_manifest_not_separated_by_commas_is_one_problem_naming_the_separator(cohort, separator):
    # A spreadsheet's CSV export in many locales separates with ';' (or tabs): one line saying
    # so, not "unknown column 'study_id;patient_id;...'" and 29 missing columns.
    row = ["s1", "p1", "ct/s1.nii.gz", "1"] + [""] * (len(manifest_columns) - 4)
    path = cohort / "semicolons.csv"
    path.write_text(separator.join(manifest_columns) + "\n" + separator.join(row) + "\n")
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith(f"row 1: columns separated by {separator!r}")
    assert "comma" in err.value.problems[0]
