"""CT readers on real scanner output (shared/data/real_ct) and on broken copies of it."""

import json
import shutil
import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from sapsam_jax.io import CTLoadError, load_ct, save_nifti
from sapsam_jax.io._dicom import _native_pixels

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SECRETS = ("Doe^Jane", "Doe", "Jane", "19610203", "PID-777")


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def cip(real_ct_dir):
    """cip_ct64 read once from DICOM: the reference for the broken copies below."""
    return load_ct(real_ct_dir / "cip_ct64" / "dicom")


@pytest.fixture
def series(tmp_path, real_ct_dir):
    """A writable copy of the 79-file cip_ct64 DICOM series (IMG0001 lowest, IMG0079 highest)."""
    folder = tmp_path / "series"
    shutil.copytree(real_ct_dir / "cip_ct64" / "dicom", folder)
    return folder


def edit_all(folder, edit):
    """Apply ``edit(ds, n)`` to every file of a series copy (n = 0.. in file-name order)."""
    for n, path in enumerate(sorted(folder.glob("*.dcm"))):
        ds = pydicom.dcmread(path)
        edit(ds, n)
        ds.save_as(path)


def write_nifti(path, data, affine=LPS_FROM_RAS):
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=1)
    nib.save(image, path)
    return path


def enhanced_ct(series_dir, out_path, order):
    """One multi-frame Enhanced CT file made of the series' slices, frames in ``order``."""
    sources = [pydicom.dcmread(p) for p in sorted(series_dir.glob("*.dcm"))]
    first = sources[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = EnhancedCTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    for keyword in ("Modality", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns"):
        setattr(ds, keyword, getattr(first, keyword))
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.NumberOfFrames = len(order)
    shared = Dataset()
    shared.PlaneOrientationSequence = [Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = first.ImageOrientationPatient
    shared.PixelMeasuresSequence = [Dataset()]
    shared.PixelMeasuresSequence[0].PixelSpacing = first.PixelSpacing
    shared.PixelValueTransformationSequence = [Dataset()]
    shared.PixelValueTransformationSequence[0].RescaleSlope = 1
    shared.PixelValueTransformationSequence[0].RescaleIntercept = -1000
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for n in order:
        group = Dataset()
        group.PlanePositionSequence = [Dataset()]
        group.PlanePositionSequence[0].ImagePositionPatient = sources[n].ImagePositionPatient
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    stored = np.stack([sources[n].pixel_array.astype(np.int16) + 1000 for n in order])
    ds.PixelData = stored.tobytes()
    ds.save_as(out_path, enforce_file_format=True)
    return out_path


# ----------------------------------------------------------------------------- real data


def test_cip_dicom_series_and_nifti_load_to_the_same_canonical_volume(real_ct_dir, cip):
    nifti = load_ct(real_ct_dir / "cip_ct64" / "ct.nii.gz")
    assert cip.hu.dtype == np.int16 and cip.hu.shape == (79, 64, 64)
    np.testing.assert_array_equal(cip.hu, nifti.hu)
    np.testing.assert_allclose(cip.spacing, (3.98734, 4.171872, 4.171872), atol=1e-4)
    np.testing.assert_allclose(nifti.spacing, cip.spacing, atol=1e-4)
    np.testing.assert_allclose(nifti.affine, cip.affine, atol=1e-3)
    # k -> +S, j -> +P, i -> +L, origin at the first DICOM slice's ImagePositionPatient.
    expected = np.array(
        [[0, 0, 4.171872, -128.414], [0, 4.171872, 0, -264.414], [3.98734, 0, 0, -360.256]]
    )
    np.testing.assert_allclose(cip.affine[:3], expected, atol=1e-3)
    assert cip.meta["slice_count"] == 79 and cip.meta["manufacturer"] == "GE Medical Systems"


def test_left_lung_has_higher_i_and_apex_high_k(real_ct_dir):
    labels = load_ct(real_ct_dir / "cip_ct64" / "lung_LR_ref.nii.gz").hu  # 1 right, 2 left
    right, left, airway = (np.argwhere(labels == n).mean(axis=0) for n in (1, 2, 3))
    width = labels.shape[2]
    assert right[2] < width / 2 <= left[2]  # 17.7 vs 46.9 of 64 columns
    lungs = np.argwhere(np.isin(labels, (1, 2)))
    assert lungs[:, 0].max() >= 0.9 * (labels.shape[0] - 1)  # apex near the top slice
    assert airway[0] > lungs[:, 0].mean() + 10  # the trachea sits above the lungs


def test_a0001_series_sorted_by_z_with_tumour_in_left_lung(real_ct_dir):
    folder = real_ct_dir / "lung_pet_ct_dx" / "A0001_chest_5mm_dicom"
    ct = load_ct(folder)
    assert ct.hu.shape == (64, 512, 512)
    np.testing.assert_allclose(ct.spacing, (5.0, 0.841796875, 0.841796875))
    boxes = json.loads((folder.parent / "A0001_tumour_bboxes.json").read_text())
    for box in boxes:
        k = box["slice_index_k"]
        assert ct.index_to_lps([k, 0, 0])[2] == pytest.approx(box["z_mm"])
        tumour = ct.hu[k, box["row_min"] : box["row_max"] + 1, box["col_min"] : box["col_max"] + 1]
        assert np.median(tumour) > -100  # soft tissue, not lung air
        assert (box["col_min"] + box["col_max"]) / 2 > 256  # patient's left half
    # Files are stored head first (1-01 is the top slice): sorting put it at the highest k.
    top = pydicom.dcmread(folder / "1-01.dcm")
    np.testing.assert_array_equal(ct.hu[-1], top.pixel_array.astype(np.int32) - 1024)
    assert ct.index_to_lps([63, 0, 0])[2] == pytest.approx(float(top.ImagePositionPatient[2]))
    assert ct.meta["scanner_model"] == "Brilliance16" and ct.meta["convolution_kernel"] == "B"


def test_a0002_nifti_tumour_in_right_lung(real_ct_dir):
    path = real_ct_dir / "lung_pet_ct_dx" / "A0002_thorax_8mm_ct.nii.gz"
    ct = load_ct(path)
    assert ct.hu.shape == (30, 512, 512)
    np.testing.assert_allclose(ct.spacing, (8.0, 0.646484375, 0.646484375))
    boxes = json.loads((path.parent / "A0002_tumour_bboxes.json").read_text())
    for box in boxes:
        assert ct.index_to_lps([box["slice_index_k"], 0, 0])[2] == pytest.approx(box["z_mm"])
        assert (box["col_min"] + box["col_max"]) / 2 < 256  # patient's right half


def test_ras_nifti_is_flipped_to_lps(real_ct_dir):
    path = real_ct_dir / "totalseg_abdomen" / "example_ct_sm.nii.gz"
    image = nib.load(path)
    raw = np.asanyarray(image.dataobj)  # (x -> R, y -> A, z -> S)
    ct = load_ct(path)
    np.testing.assert_array_equal(ct.hu, raw.transpose(2, 1, 0)[:, ::-1, ::-1])
    # The same voxel lands on the same patient point through either affine.
    x, y, z = 7, 20, 11
    k, j, i = z, raw.shape[1] - 1 - y, raw.shape[0] - 1 - x
    world = (LPS_FROM_RAS @ image.affine @ [x, y, z, 1])[:3]
    np.testing.assert_allclose(ct.index_to_lps([k, j, i]), world, atol=1e-6)
    labels = load_ct(path.parent / "example_seg.nii.gz").hu
    left_lobes = np.argwhere(np.isin(labels, (10, 11))).mean(axis=0)
    right_lower = np.argwhere(labels == 14).mean(axis=0)
    assert left_lobes[2] > labels.shape[2] / 2 > right_lower[2]
    assert left_lobes[0] > labels.shape[0] / 2  # lung bases at the top of an abdomen scan


def test_save_nifti_round_trips_with_the_same_world_coordinates(tmp_path, real_ct_dir):
    for source in ("cip_ct64/dicom", "totalseg_abdomen/example_ct_sm.nii.gz"):
        ct = load_ct(real_ct_dir / source)
        out = save_nifti(tmp_path / "ct.nii.gz", ct.hu, ct)
        again = load_ct(out)
        np.testing.assert_array_equal(again.hu, ct.hu)
        np.testing.assert_allclose(again.affine, ct.affine, atol=1e-4)
        image = nib.load(out)
        assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
        k, j, i = 5, 17, 23
        world = (LPS_FROM_RAS @ image.affine @ [i, j, k, 1])[:3]
        np.testing.assert_allclose(world, ct.index_to_lps([k, j, i]), atol=1e-4)
        assert np.asanyarray(image.dataobj)[i, j, k] == ct.hu[k, j, i]
    mask = save_nifti(tmp_path / "mask.nii", ct.hu > -500, ct)
    assert nib.load(mask).get_data_dtype() == np.uint8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "mask.nii"]  # no temps
    with pytest.raises(ValueError, match="not on the CT grid"):
        save_nifti(tmp_path / "bad.nii.gz", ct.hu[1:], ct)


# ----------------------------------------------------------------------------- DICOM variants


def test_multiframe_enhanced_ct_matches_the_series(tmp_path, real_ct_dir, cip):
    order = np.random.default_rng(0).permutation(79)
    path = enhanced_ct(real_ct_dir / "cip_ct64" / "dicom", tmp_path / "enhanced.dcm", order)
    ct = load_ct(path)
    np.testing.assert_array_equal(ct.hu, cip.hu)
    np.testing.assert_allclose(ct.affine, cip.affine, atol=1e-6)


def test_a_damaged_functional_group_is_an_error_that_names_the_file(tmp_path, real_ct_dir):
    path = enhanced_ct(real_ct_dir / "cip_ct64" / "dicom", tmp_path / "enhanced.dcm", range(4))
    data = path.read_bytes()
    at = data.index(b"\x28\x00\x53\x10DS") + 5  # RescaleSlope in the shared group: VR "D\0"
    path.write_bytes(data[:at] + b"\x00" + data[at + 1 :])
    with pytest.raises(CTLoadError, match=r"enhanced\.dcm: .*corrupt"):
        load_ct(path)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits_stored", [12, 16])
def test_fast_native_decoding_matches_pydicom(series, signed, bits_stored):
    """The uncompressed fast path against pydicom's pixel_array (the reference)."""
    ds = pydicom.dcmread(series / "IMG0040.dcm")
    values = np.random.default_rng(0).integers(0, 1 << 16, size=(64, 64), dtype=np.uint16)
    ds.PixelData = values.tobytes()  # high bits set: masked (unsigned) or sign bits (signed)
    ds.PixelRepresentation, ds.BitsStored, ds.HighBit = int(signed), bits_stored, bits_stored - 1
    reference = ds.pixel_array
    fast = _native_pixels(ds)
    assert fast is not None and fast.dtype == reference.dtype
    np.testing.assert_array_equal(fast, reference)


def test_per_slice_rescale_is_applied(series, cip):
    def shift(ds, n):  # odd slices stored 100 lower with intercept +100: same HU
        if n % 2:
            ds.PixelData = (ds.pixel_array - 100).astype(np.int16).tobytes()
            ds.RescaleIntercept = 100

    edit_all(series, shift)
    np.testing.assert_array_equal(load_ct(series).hu, cip.hu)


def test_rle_compressed_series_decodes(series, cip):
    edit_all(series, lambda ds, n: ds.compress(RLELossless))
    np.testing.assert_array_equal(load_ct(series).hu, cip.hu)


def test_missing_decoder_names_the_packages(series):
    from pydicom.pixels import get_decoder

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS plugin is installed here")
    path = series / "IMG0010.dcm"
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless  # same bytes, now needs a JPEG-LS plugin
    ds.save_as(path)
    with pytest.raises(CTLoadError, match=r"IMG0010\.dcm.*JPEG-LS.*(pylibjpeg|gdcm|pyjpegls)"):
        load_ct(series)


def test_series_uid_picks_one_of_two_series(series, cip):
    second = generate_uid()

    def split(ds, n):
        if n >= 40:
            ds.SeriesInstanceUID, ds.SeriesDescription = second, "second half"

    edit_all(series, split)
    with pytest.raises(CTLoadError, match="2 series found") as err:
        load_ct(series)
    assert f"{second}: 39 slice(s), 'second half'" in str(err.value)
    assert "40 slice(s)" in str(err.value)
    ct = load_ct(series, series_uid=second)
    np.testing.assert_array_equal(ct.hu, cip.hu[40:])
    with pytest.raises(CTLoadError, match="no series '1.2.3'"):
        load_ct(series, series_uid="1.2.3")


def test_small_tilt_is_accepted_with_its_exact_affine(series, cip):
    angle = np.deg2rad(0.3)
    iop = [np.cos(angle), np.sin(angle), 0, -np.sin(angle), np.cos(angle), 0]
    edit_all(series, lambda ds, n: setattr(ds, "ImageOrientationPatient", iop))
    ct = load_ct(series)
    np.testing.assert_array_equal(ct.hu, cip.hu)
    np.testing.assert_allclose(ct.affine[:3, 2], np.multiply(iop[:3], 4.171872), atol=1e-5)


def test_missing_slice_is_an_error_or_interpolated(series, cip):
    (series / "IMG0040.dcm").unlink()  # sorted index 39
    with pytest.raises(CTLoadError, match=r"1 missing slice\(s\) between .*IMG0039.*IMG0041"):
        load_ct(series)
    with pytest.warns(UserWarning, match="missing slice"):
        ct = load_ct(series, allow_gaps=True)
    assert ct.hu.shape == cip.hu.shape and ct.meta["interpolated_slices"] == 1
    mean = (cip.hu[38].astype(float) + cip.hu[40]) / 2
    assert np.abs(ct.hu[39] - mean).max() <= 0.5
    np.testing.assert_array_equal(np.delete(ct.hu, 39, 0), np.delete(cip.hu, 39, 0))
    np.testing.assert_allclose(ct.affine, cip.affine, atol=1e-3)


def test_gap_error_names_the_manifest_column_in_a_failures_csv_reason(series):
    # preprocess.py flattens a failure onto one line (failures.csv, the warning): the advice
    # must stay apart from the gap it follows and name what a manifest user sets (allow_gaps
    # 1; 'True' is refused by read_manifest), not only load_ct's keyword.
    from sapsam_jax.data._cohort import failure_reason

    (series / "IMG0040.dcm").unlink()
    with pytest.raises(CTLoadError) as err:
        load_ct(series)
    reason = failure_reason(err.value)
    assert "(IMG0041.dcm); pass allow_gaps=True" in reason
    assert "manifest column allow_gaps: 1" in reason


def test_uneven_spacing_is_an_error_or_resampled(series, cip):
    def nudge(ds, n):  # move slice 40 (IMG0041) up by 1.5 mm: steps of 5.49 and 2.49 mm
        if n == 40:
            ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 1.5

    edit_all(series, nudge)
    with pytest.raises(CTLoadError, match=r"uneven step of 5.487 mm between .*IMG0040.*IMG0041"):
        load_ct(series)
    with pytest.warns(UserWarning, match="uneven step"):
        ct = load_ct(series, allow_gaps=True)
    assert ct.hu.shape == cip.hu.shape and ct.meta["interpolated_slices"] == 1
    # Slice 40 is rebuilt between the measured slices 39 (below) and 40 (now 1.5 mm higher).
    below = cip.index_to_lps([39, 0, 0])[2]
    above = float(pydicom.dcmread(series / "IMG0041.dcm").ImagePositionPatient[2])
    weight = (ct.index_to_lps([40, 0, 0])[2] - below) / (above - below)  # about 0.73
    expected = (1 - weight) * cip.hu[39] + weight * cip.hu[40].astype(float)
    assert 0.7 < weight < 0.75 and np.abs(ct.hu[40] - expected).max() <= 0.5 + 1e-6
    np.testing.assert_array_equal(np.delete(ct.hu, 40, 0), np.delete(cip.hu, 40, 0))


# ----------------------------------------------------------------------------- bad inputs


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CTLoadError, match="empty.*empty folder"):
        load_ct(tmp_path / "empty")


def test_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("not a scan")
    with pytest.raises(CTLoadError, match="no DICOM image files among its 1 file"):
        load_ct(tmp_path)


def test_missing_path_and_unsupported_extension(tmp_path):
    with pytest.raises(CTLoadError, match="nope.nii.gz: no such file or folder"):
        load_ct(tmp_path / "nope.nii.gz")
    (tmp_path / "scan.png").write_bytes(b"\x89PNG")
    with pytest.raises(CTLoadError, match=r"scan.png: unsupported file type '.png'"):
        load_ct(tmp_path / "scan.png")


def test_non_ct_modality(series):
    edit_all(series, lambda ds, n: setattr(ds, "Modality", "MR"))
    with pytest.raises(CTLoadError, match="Modality is 'MR', not 'CT', in 79 file"):
        load_ct(series)


def test_duplicated_slice(series):
    shutil.copy(series / "IMG0040.dcm", series / "IMG0040_again.dcm")
    with pytest.raises(CTLoadError, match=r"duplicate slice position .*IMG0040.*IMG0040_again"):
        load_ct(series)


def test_truncated_dicom(series):
    path = series / "IMG0040.dcm"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CTLoadError, match=r"IMG0040.dcm: pixel data truncated or corrupt"):
        load_ct(series)
    path.write_bytes(path.read_bytes()[:300])  # cut inside the file meta header
    with pytest.raises(CTLoadError, match=r"IMG0040.dcm: .*truncated or corrupt"):
        load_ct(series)


# Explicit-VR elements (tag + VR) of slice 01.dcm, each damaged below.
_MODALITY, _POSITION = b"\x08\x00\x60\x00CS", b"\x20\x00\x32\x00DS"
_BITS_ALLOCATED, _PIXEL_DATA = b"\x28\x00\x00\x01US", b"\xe0\x7f\x10\x00OW"


@pytest.mark.parametrize(
    "element, offset, byte",
    [
        (_MODALITY, 5, 0),  # VR "C\0": pydicom converts lazily and raised NotImplementedError
        (_POSITION, 5, 0),
        (_BITS_ALLOCATED, 6, 0x20),  # length 32: the value runs on, pydicom raised TypeError
        (_PIXEL_DATA, 8, 0),  # PixelData of length 0: len(None) raised TypeError
    ],
    ids=["modality-vr", "position-vr", "bits-allocated-length", "pixel-data-length"],
)
def test_a_damaged_element_is_an_error_that_names_the_file(tmp_path, element, offset, byte):
    files = _identified_series(tmp_path / "series")
    data = files[1].read_bytes()
    at = data.index(element) + offset
    files[1].write_bytes(data[:at] + bytes([byte]) + data[at + 1 :])
    with pytest.raises(CTLoadError, match=r"01\.dcm: .*(corrupt|truncated)") as err:
        load_ct(tmp_path / "series")
    assert not any(secret in str(err.value) for secret in SECRETS)


def test_a_damaged_non_image_object_beside_the_series_is_skipped(tmp_path):
    # A dose report (no pixel data) with a damaged element is in no volume: the eager reads of
    # the attributes the loader uses must not refuse the folder for it.
    files = _identified_series(tmp_path / "series")
    report = pydicom.dcmread(files[0])
    del report.PixelData
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"
    report.SOPInstanceUID = report.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    report.save_as(tmp_path / "series" / "dose.dcm", enforce_file_format=True)
    data = (tmp_path / "series" / "dose.dcm").read_bytes()
    at = data.index(_MODALITY) + 5
    (tmp_path / "series" / "dose.dcm").write_bytes(data[:at] + b"\x00" + data[at + 1 :])
    assert load_ct(tmp_path / "series").hu.shape == (4, 8, 8)


def test_a_malformed_number_of_frames_is_an_error_that_names_the_file(tmp_path):
    files = _identified_series(tmp_path / "series")
    ds = pydicom.dcmread(files[1])
    ds.NumberOfFrames = 1
    ds.save_as(files[1])
    data = files[1].read_bytes()  # (0028,0008) IS "1 " -> "1a": int() raised a bare ValueError
    files[1].write_bytes(
        data.replace(b"\x28\x00\x08\x00IS\x02\x001 ", b"\x28\x00\x08\x00IS\x02\x001a")
    )
    with pytest.raises(CTLoadError, match=r"01\.dcm: malformed NumberOfFrames \('1a'\)"):
        load_ct(tmp_path / "series")


def test_running_out_of_memory_decoding_pixels_is_not_called_corruption(tmp_path, monkeypatch):
    # _pixels turns pydicom's failures on damaged pixel attributes into "truncated or corrupt";
    # a MemoryError says nothing about the file and must not send the user to replace it.
    from sapsam_jax.io import _dicom

    _identified_series(tmp_path / "series")

    def out_of_memory(ds):
        raise MemoryError("Unable to allocate 8.00 GiB")

    monkeypatch.setattr(_dicom, "_native_pixels", out_of_memory)
    with pytest.raises(MemoryError):
        load_ct(tmp_path / "series")


def test_a_number_of_frames_of_nan_is_an_error_that_names_the_file(tmp_path):
    files = _identified_series(tmp_path / "series")
    ds = pydicom.dcmread(files[1])
    ds.NumberOfFrames = 100
    ds.save_as(files[1])
    data = files[1].read_bytes()  # IS "100 " -> "nan ": float() takes it, int() raised ValueError
    files[1].write_bytes(
        data.replace(b"\x28\x00\x08\x00IS\x04\x00100 ", b"\x28\x00\x08\x00IS\x04\x00nan ")
    )
    with pytest.raises(CTLoadError, match=r"01\.dcm: malformed NumberOfFrames \('nan'\)"):
        load_ct(tmp_path / "series")


def private_object(path, *, rows_columns: bool):
    """A file of a private SOP class without pixel data (a Siemens CSA report, say)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.3.12.2.1107.5.9.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.SeriesInstanceUID = "CT", generate_uid()
    if rows_columns:
        ds.Rows, ds.Columns = 512, 512
    ds.save_as(path, enforce_file_format=True)


def test_private_non_image_objects_beside_the_series_are_skipped(series, cip):
    private_object(series / "CSA_REPORT.dcm", rows_columns=False)
    path = series / "IMG0001.dcm"  # the first slice: the one the scan's description comes from
    data = path.read_bytes()
    at = data.index(b"\x18\x00\x50\x00") + 8  # (0018,0050) SliceThickness: tag, 4-byte length
    assert data[at : at + 7] == b"3.98734"
    path.write_bytes(data[:at] + b"3,98734" + data[at + 7 :])  # a decimal comma: descriptive only
    ct = load_ct(series)
    np.testing.assert_array_equal(ct.hu, cip.hu)
    assert ct.meta["slice_thickness_mm"] is None and cip.meta["slice_thickness_mm"] == 3.98734
    # A private object with image attributes but no pixels is an image that lost them.
    private_object(series / "CSA_REPORT.dcm", rows_columns=True)
    with pytest.raises(CTLoadError, match="CSA_REPORT.dcm: DICOM image without pixel data"):
        load_ct(series)


def test_a_file_with_several_sop_classes_is_judged_by_its_image_attributes(series, cip):
    # A damaged header's SOPClassUID can read as a MultiValue, which has no UID name: it stopped
    # the read with an AttributeError instead of skipping the object or naming the file.
    private_object(series / "DAMAGED.dcm", rows_columns=False)
    ds = pydicom.dcmread(series / "DAMAGED.dcm")
    ds.SOPClassUID = ["1.3.12.2.1107.5.9.1", "1.2.840.10008.5.1.4.1.1.2"]
    ds.file_meta.MediaStorageSOPClassUID = "1.3.12.2.1107.5.9.1"
    ds.save_as(series / "DAMAGED.dcm", enforce_file_format=True)
    np.testing.assert_array_equal(load_ct(series).hu, cip.hu)
    ds.Rows, ds.Columns = 512, 512
    ds.save_as(series / "DAMAGED.dcm", enforce_file_format=True)
    with pytest.raises(CTLoadError, match="DAMAGED.dcm: DICOM image without pixel data"):
        load_ct(series)


def test_localizer_images_in_the_folder_are_skipped(series, cip):
    first = pydicom.dcmread(series / "IMG0001.dcm")
    for name, series_uid in (
        ("SCOUT_SAME.dcm", first.SeriesInstanceUID),
        ("SCOUT_OWN.dcm", "1.2.9"),
    ):
        scout = pydicom.dcmread(series / "IMG0001.dcm")  # a coronal projection in its series
        scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        scout.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        scout.SeriesInstanceUID, scout.SOPInstanceUID = series_uid, generate_uid()
        scout.save_as(series / name)
    np.testing.assert_array_equal(load_ct(series).hu, cip.hu)
    for path in series.glob("IMG*.dcm"):
        path.unlink()
    with pytest.raises(CTLoadError, match=r"no DICOM image files .*\(2 localizer image\(s\) only"):
        load_ct(series)


def test_truncated_nifti(tmp_path, real_ct_dir):
    data = (real_ct_dir / "cip_ct64" / "ct.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CTLoadError, match="cut.nii.gz: .*truncated or corrupt"):
        load_ct(tmp_path / "cut.nii.gz")


def test_nifti_with_nans(tmp_path):
    data = np.full((8, 8, 8), -1000.0, dtype=np.float32)
    data[2, 3, 4] = data[5, 5, 5] = np.nan
    path = write_nifti(tmp_path / "nan.nii.gz", data)
    with pytest.raises(CTLoadError, match=r"nan.nii.gz: 2 voxel\(s\) are NaN"):
        load_ct(path)


def test_nifti_without_orientation(tmp_path):
    image = nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4))
    image.set_qform(None, code=0)
    image.set_sform(None, code=0)
    nib.save(image, tmp_path / "bare.nii")
    with pytest.raises(CTLoadError, match="no orientation"):
        load_ct(tmp_path / "bare.nii")


def test_nifti_in_meters_is_read_in_mm(tmp_path, real_ct_dir):
    reference = load_ct(real_ct_dir / "cip_ct64" / "ct.nii.gz")
    image = nib.load(real_ct_dir / "cip_ct64" / "ct.nii.gz")
    meters = np.array(image.affine)
    meters[:3] /= 1000.0
    scaled = nib.Nifti1Image(np.asanyarray(image.dataobj), meters)
    scaled.header.set_xyzt_units(xyz="meter")
    nib.save(scaled, tmp_path / "meters.nii.gz")
    ct = load_ct(tmp_path / "meters.nii.gz")
    np.testing.assert_allclose(ct.spacing, reference.spacing, rtol=1e-5)
    np.testing.assert_allclose(ct.affine, reference.affine, rtol=1e-5, atol=1e-3)


def test_2d_images(tmp_path, series):
    with pytest.raises(CTLoadError, match="IMG0001.dcm: a single 2-D image"):
        load_ct(series / "IMG0001.dcm")
    path = write_nifti(tmp_path / "slice.nii.gz", np.zeros((64, 64), np.int16))
    with pytest.raises(CTLoadError, match="slice.nii.gz: a 2-D image"):
        load_ct(path)
    for extra in sorted(series.glob("*.dcm"))[1:]:
        extra.unlink()
    with pytest.raises(CTLoadError, match="only one slice, a 2-D image"):
        load_ct(series)


def test_slices_off_the_stack_are_an_error(series):
    # One slice shifted in-plane (another acquisition, a bent stack): refused, named.
    def shift(ds, n):
        if n == 40:
            ds.ImagePositionPatient[1] = float(ds.ImagePositionPatient[1]) + 3.0

    edit_all(series, shift)
    with pytest.raises(CTLoadError, match=r"IMG0041.dcm lies 3.0 mm off the line of slice origins"):
        load_ct(series)


def test_a_steep_shear_in_image_positions_is_refused_as_oblique(series):
    # Gantry tilt of 15 degrees recorded only in ImagePositionPatient: a sheared grid, too steep.
    def shear(ds, n):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + np.tan(np.deg2rad(15)) * z, z]

    edit_all(series, shear)
    with pytest.raises(CTLoadError, match=r"oblique acquisition, voxel axes are up to 15.0 deg"):
        load_ct(series)


def test_a_small_gantry_tilt_loads_with_its_sheared_geometry(series, cip):
    # Slice planes tilted 0.5 degrees about the left-right axis, the table moving along the
    # patient's axis (origins straight up z): each origin drifts 0.4 % of the scan length off
    # the slice normal, 2.7 mm over these 79 slices, more than half a pixel.
    tilt = np.deg2rad(0.5)
    iop = [1.0, 0.0, 0.0, 0.0, np.cos(tilt), -np.sin(tilt)]
    origins = {}

    def lean(ds, n):
        ds.ImageOrientationPatient = iop
        origins[n] = np.array([float(v) for v in ds.ImagePositionPatient])

    edit_all(series, lean)
    ct = load_ct(series)
    np.testing.assert_array_equal(ct.hu, cip.hu)  # the same voxels ...
    # ... each placed where its file says: the first pixel of every slice maps to its origin.
    to_index = np.linalg.inv(ct.affine)
    index = np.array([to_index @ np.r_[o, 1.0] for o in origins.values()])[:, :3]
    np.testing.assert_allclose(index, np.round(index), atol=1e-3)
    assert sorted(np.round(index[:, 0]).astype(int)) == list(range(ct.hu.shape[0]))


def test_malformed_tags_are_errors_that_name_the_file(series):
    path = series / "IMG0040.dcm"
    ds = pydicom.dcmread(path)
    del ds.Rows
    ds.save_as(path)
    with pytest.raises(CTLoadError, match=r"IMG0040.dcm: no Rows/Columns"):
        load_ct(series)
    shutil.copy(series / "IMG0041.dcm", path)  # a good file back, then a bad RescaleIntercept
    data = path.read_bytes()
    at = data.index(b"(\x00R\x10") + 8  # (0028,1052) RescaleIntercept: tag, 4-byte length
    path.write_bytes(data[:at] + b"O" + data[at + 1 :])
    with pytest.raises(CTLoadError, match=r"IMG0040.dcm: malformed RescaleIntercept"):
        load_ct(series)


def test_oblique_orientation(series):
    angle = np.deg2rad(10)
    iop = [np.cos(angle), np.sin(angle), 0, -np.sin(angle), np.cos(angle), 0]
    edit_all(series, lambda ds, n: setattr(ds, "ImageOrientationPatient", iop))
    with pytest.raises(CTLoadError, match=r"oblique acquisition.*10.0 degrees"):
        load_ct(series)


# ----------------------------------------------------------------------------- privacy


def test_patient_identity_never_reaches_meta_or_errors(series):
    def identify(ds, n):
        ds.PatientName, ds.PatientBirthDate, ds.PatientID = "Doe^Jane", "19610203", "PID-777"

    edit_all(series, identify)
    ct = load_ct(series)
    text = repr(ct.meta) + repr(ct)
    assert not any(secret in text for secret in SECRETS)
    assert not any("patient" in key.lower() for key in ct.meta)
    messages = []
    shutil.copy(series / "IMG0040.dcm", series / "IMG0040_again.dcm")
    for edit in (None, lambda ds, n: setattr(ds, "SeriesInstanceUID", f"1.2.{n % 2}")):
        if edit:
            edit_all(series, edit)
        with pytest.raises(CTLoadError) as err:
            load_ct(series)
        messages.append(str(err.value))
    assert "duplicate" in messages[0] and "2 series found" in messages[1]
    assert not any(secret in m for secret in SECRETS for m in messages)


def _identified_series(folder, n_slices=4, series=None):
    """A small CT series (explicit VR little endian) whose patient module is filled in; returns
    each file's bytes."""
    from pydicom.uid import CTImageStorage

    folder.mkdir(exist_ok=True)
    series = series or [generate_uid()] * n_slices
    study, files = generate_uid(), []
    for z, series_uid in enumerate(series):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.Modality, ds.SeriesDescription = "CT", "chest"
        ds.PatientName, ds.PatientBirthDate, ds.PatientID = "Doe^Jane", "19610203", "PID-777"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, z], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.Rows, ds.Columns = [1, 1], 8, 8
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.zeros((8, 8), np.int16).tobytes()
        path = folder / f"{z:02d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def _run_on(path, tag: bytes, until: bytes) -> None:
    """Damage the length field of the explicit-VR element ``tag`` (2-byte length) so that its
    value runs on over every element before the tag ``until``."""
    data = path.read_bytes()
    start, end = data.index(tag), data.index(until)
    length = (end - start - 8).to_bytes(2, "little")
    path.write_bytes(data[: start + 6] + length + data[start + 8 :])


def test_a_header_value_run_on_over_the_patient_module_is_not_quoted(tmp_path):
    modality, description = b"\x08\x00\x60\x00CS", b"\x08\x00\x3e\x10LO"
    study_uid = b"\x20\x00\x0d\x00"  # (0020,000D): the first element after the patient module
    for path in _identified_series(tmp_path / "modality"):
        _run_on(path, modality, study_uid)
    with pytest.raises(CTLoadError, match="Modality is <.*not shown.*not 'CT'") as err:
        load_ct(tmp_path / "modality")
    messages = [str(err.value)]
    files = _identified_series(tmp_path / "two", series=["1.2.3"] * 2 + ["1.2.4"] * 2)
    for path in files:
        _run_on(path, description, study_uid)
    with pytest.raises(CTLoadError, match="2 series found") as err:
        load_ct(tmp_path / "two")
    messages.append(str(err.value))
    assert "1.2.4: 2 slice(s), <" in messages[1]
    one = _identified_series(tmp_path / "one")  # loads: the run-on description is not kept
    for path in one:
        _run_on(path, description, study_uid)
    ct = load_ct(tmp_path / "one")
    assert ct.meta["series_description"] is None and ct.meta["study_uid"]
    messages.append(repr(ct.meta))
    assert not any(secret in m for secret in SECRETS for m in messages), messages


def test_descriptions_in_any_script_are_kept_and_shown(tmp_path):
    # Full-width (U+3000) and no-break (U+00A0) spaces are not str.isprintable(): such
    # descriptions were dropped from ct.meta and listed as "a damaged header?".
    files = _identified_series(tmp_path / "ja", series=["1.2.3"] * 2 + ["1.2.4"] * 2)
    for n, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8
        ds.SeriesDescription = "胸部\u3000単純CT" if n < 2 else "Thorax\xa0nativ"
        ds.save_as(path, enforce_file_format=True)
    with pytest.raises(CTLoadError, match="2 series found") as err:
        load_ct(tmp_path / "ja")
    for description in ("胸部\u3000単純CT", "Thorax\xa0nativ"):
        assert repr(description) in str(err.value)
    ct = load_ct(tmp_path / "ja", series_uid="1.2.3")
    assert ct.meta["series_description"] == "胸部\u3000単純CT"


def test_pydicom_value_warnings_of_a_damaged_header_do_not_carry_the_patient(tmp_path, caplog):
    # SOPClassUID (0008,0016) run on over the patient module, in a file cut before its pixels:
    # pydicom's UI check warned and logged "Invalid value for VR UI: '<the raw bytes>'".
    sop_class, study_uid = b"\x08\x00\x16\x00UI", b"\x20\x00\x0d\x00"
    files = _identified_series(tmp_path / "cut")
    _run_on(files[1], sop_class, study_uid)
    data = files[1].read_bytes()
    files[1].write_bytes(data[: data.index(b"\xe0\x7f\x10\x00")])  # before PixelData
    with pytest.warns() as warned, pytest.raises(CTLoadError, match="01.dcm: DICOM image without"):
        warnings.warn("one warning, so that pytest.warns passes without pydicom's", stacklevel=1)
        load_ct(tmp_path / "cut")
    said = [str(w.message) for w in warned] + [r.getMessage() for r in caplog.records]
    assert not any(secret in text for secret in SECRETS for text in said), said
