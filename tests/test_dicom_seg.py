"""DICOM SEG output: frames equal the PNG masks, references and codes are right, dciodvfy accepts
it, and messy sources (empty or UUID-text UIDs, missing Type 2 attributes) still give a valid SEG."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from conftest import dciodvfy

from lungcbir.cli import main
from lungcbir.dicom_ids import derived_uid, is_valid_uid, repair_identifiers
from lungcbir.dicom_seg import SegmentKind, write_dicom_seg
from lungcbir.inference import LungModel
from lungcbir.io import find_image_files, read_file


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def seg_frames(path) -> dict[tuple[float, int], np.ndarray]:
    """Decode a SEG with pydicom alone: {(source z position, segment number): frame (bool)}."""
    seg = pydicom.dcmread(path)
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    shared = seg.SharedFunctionalGroupsSequence[0]
    frames = {}
    for item, frame in zip(seg.PerFrameFunctionalGroupsSequence, pixels):
        z = round(float(item.PlanePositionSequence[0].ImagePositionPatient[2]), 3)
        identification = item if "SegmentIdentificationSequence" in item else shared  # shared with one segment
        segment = int(identification.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        frames[(z, segment)] = frame.astype(bool)
    return frames


def referenced_sops(path) -> list[str]:
    seg = pydicom.dcmread(path)
    return [str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            for item in seg.PerFrameFunctionalGroupsSequence]


def source_z(path) -> float:
    return round(float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2]), 3)


def assert_frames_equal_pngs(seg_path, dicom_files, png_folder):
    frames = seg_frames(seg_path)
    assert len(frames) == len(dicom_files)  # one frame per source slice, empty ones too
    for path in dicom_files:
        png = cv2.imread(str(png_folder / f"{Path(path).stem}_mask.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(frames[(source_z(path), 1)], png > 0), path


def test_segment_dicom_seg_frames_equal_png_masks(phantom_dir, bundled_weights, tmp_path):
    series = phantom_dir / "dicom" / "phantom01"
    result = invoke("segment", series, "--format", "dicom-seg", "--out", tmp_path / "seg",
                    "--weights", bundled_weights)
    assert result.exit_code == 0, result.output
    seg_path = tmp_path / "seg" / "phantom01_seg.dcm"
    assert f"-> {seg_path}" in result.output
    assert invoke("segment", series, "--format", "png", "--out", tmp_path / "png",
                  "--weights", bundled_weights).exit_code == 0
    files = sorted(find_image_files([series]))
    assert_frames_equal_pngs(seg_path, files, tmp_path / "png")
    assert any(frame.any() for frame in seg_frames(seg_path).values())  # not a test of empty masks only

    seg = pydicom.dcmread(seg_path)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert sorted(referenced_sops(seg_path)) == sorted(str(s.SOPInstanceUID) for s in sources)
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {str(i.ReferencedSOPInstanceUID) for i in referenced.ReferencedInstanceSequence} == \
        {str(s.SOPInstanceUID) for s in sources}
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate", "FrameOfReferenceUID"):
        assert seg[keyword].value == sources[0][keyword].value, keyword
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "Lung"
    assert (segment.SegmentedPropertyTypeCodeSequence[0].CodeValue,
            segment.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator) == ("39607008", "SCT")
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmVersion == LungModel.load(bundled_weights).model_id
    assert "derived" not in seg.ContentDescription  # clean sources: nothing derived


def test_write_dicom_seg_keeps_every_mask_bit(phantom_dir, tmp_path):
    """Known, non-trivial masks (the phantom's ground truth, two segments) come back bit for bit."""
    series = phantom_dir / "dicom" / "phantom02"
    slices = sorted((read_file(f)[0] for f in find_image_files([series])), key=lambda s: -s.axis_position)
    truth = sorted(find_image_files([phantom_dir / "masks" / "phantom02"]))  # superior first, like slices
    lungs = [cv2.imread(path, cv2.IMREAD_UNCHANGED) > 0 for path in truth]
    lesions = [np.roll(mask, 5, axis=1) & ~mask for mask in lungs]  # overlapping-free, other shapes
    lungs[1] = np.zeros_like(lungs[1])  # an empty frame is still a frame: frame i is always slice i
    written = write_dicom_seg(slices, {SegmentKind.LUNG: lungs, SegmentKind.LESION: lesions},
                              tmp_path / "two.dcm", "model-x")
    assert written.segments == ["Lung", "Lesion"] and written.frames == 2 * len(slices)
    frames = seg_frames(written.path)
    for item, lung, lesion in zip(slices, lungs, lesions):
        z = round(item.axis_position, 3)
        assert np.array_equal(frames[(z, 1)], lung) and np.array_equal(frames[(z, 2)], lesion)
    labels = [s.SegmentLabel for s in pydicom.dcmread(written.path).SegmentSequence]
    assert labels == ["Lung", "Lesion"]
    dciodvfy(written.path)


def test_dicom_seg_passes_dciodvfy(phantom_dir, tiny_weights, tmp_path):
    result = invoke("segment", phantom_dir / "dicom" / "phantom02", "--format", "dicom-seg",
                    "--out", tmp_path, "--weights", tiny_weights)
    assert result.exit_code == 0, result.output
    assert "(6 frames)" in result.output
    dciodvfy(tmp_path / "phantom02_seg.dcm")


def test_non_dicom_input_fails_with_one_line_and_the_rest_is_done(phantom_dir, tiny_weights, tmp_path):
    png = phantom_dir / "png" / "phantom01" / "phantom01_s001.png"
    single = min(find_image_files([phantom_dir / "dicom" / "phantom01"]))
    result = invoke("segment", png, single, "--format", "dicom-seg", "--out", tmp_path, "--weights", tiny_weights)
    assert result.exit_code == 1
    failures = [line for line in result.output.splitlines() if line.startswith("failed:")]
    assert failures == [f"failed: {png}: dicom-seg needs DICOM input"]
    assert "Traceback" not in result.output
    assert (tmp_path / f"{Path(single).stem}_seg.dcm").is_file()  # a single named file: named by its stem


def test_nifti_format_needs_a_volume(phantom_dir, tiny_weights, tmp_path):
    png = phantom_dir / "png" / "phantom01" / "phantom01_s001.png"
    result = invoke("segment", png, "--format", "nifti", "--out", tmp_path, "--weights", tiny_weights)
    assert result.exit_code == 1 and f"failed: {png}: nifti output needs a NIfTI volume input" in result.output


def test_png_format_of_a_volume_writes_a_png_per_slice(tiny_weights, tmp_path):
    import nibabel

    volume = tmp_path / "v.nii.gz"
    planes = np.full((48, 40, 3), -900, np.int16)
    planes[10:30, 5:20] = 40  # a constant plane is refused, as constant images are
    nibabel.save(nibabel.Nifti1Image(planes, np.eye(4)), str(volume))
    result = invoke("segment", volume, "--format", "png", "--out", tmp_path / "m", "--weights", tiny_weights)
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert written == [f"v_z{z:03d}_mask.png" for z in range(3)]
    assert cv2.imread(str(tmp_path / "m" / written[0]), cv2.IMREAD_UNCHANGED).shape == (40, 48)


def test_a_patient_name_of_one_component_is_written_without_a_warning(phantom_dir, tiny_weights, tmp_path):
    """Highdicom warned about every SEG of a series named like TCGA-17-Z011."""
    import warnings

    folder = tmp_path / "series"
    folder.mkdir()
    for path in sorted((phantom_dir / "dicom" / "phantom01").iterdir()):
        ds = pydicom.dcmread(path)
        ds.PatientName = "TCGA-17-Z011"
        ds.save_as(folder / path.name)
    slices = [read_file(path)[0] for path in sorted(folder.iterdir())]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        written = write_dicom_seg(slices, [s.pixels > -500 for s in slices], tmp_path / "seg.dcm", "model")
    assert pydicom.dcmread(written.path).PatientName == "TCGA-17-Z011^"  # the same name (PS3.5 6.2.1.2)


def messy_copy(series: Path, out: Path) -> list[Path]:
    """The phantom series as de-identified archives leave it (like covid-ct-md's P002)."""
    out.mkdir(parents=True)
    study, series_uid = str(uuid.uuid4()), str(uuid.uuid4())
    copies = []
    for path in sorted(find_image_files([series])):
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ""
        ds.file_meta.MediaStorageSOPInstanceUID = ""
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series_uid, ""
        for keyword in ("PatientName", "PatientBirthDate", "StudyID", "StudyDate", "ReferringPhysicianName"):
            delattr(ds, keyword)
        target = out / Path(path).name
        ds.save_as(target)
        copies.append(target)
    return copies


def test_messy_identifiers_are_derived_stable_and_valid(phantom_dir, tiny_weights, tmp_path):
    files = messy_copy(phantom_dir / "dicom" / "phantom01", tmp_path / "messy")
    for attempt in ("a", "b"):
        result = invoke("segment", tmp_path / "messy", "--format", "dicom-seg", "--out", tmp_path / attempt,
                        "--weights", tiny_weights)
        assert result.exit_code == 0, result.output
        assert f"identifiers derived for {len(files)} of {len(files)} source files" in result.output
    first, second = tmp_path / "a" / "messy_seg.dcm", tmp_path / "b" / "messy_seg.dcm"
    sops = referenced_sops(first)
    assert sops == referenced_sops(second)  # stable: the same file gets the same UID every time
    assert len(set(sops)) == len(files) and all(is_valid_uid(uid) for uid in sops)
    seg = pydicom.dcmread(first)
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert seg.StudyInstanceUID == f"2.25.{uuid.UUID(str(source.StudyInstanceUID)).int}"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == \
        f"2.25.{uuid.UUID(str(source.SeriesInstanceUID)).int}"
    assert is_valid_uid(seg.FrameOfReferenceUID) and seg.PatientName == "" and seg.PatientID == source.PatientID
    assert "derived" in seg.ContentDescription
    notes = [item.DerivationImageSequence[0].DerivationDescription for item in seg.PerFrameFunctionalGroupsSequence]
    assert all("SOPInstanceUID was missing or empty" in note for note in notes)
    dciodvfy(first)


def test_repair_identifiers_keeps_valid_ones():
    ds = pydicom.Dataset()
    ds.SOPInstanceUID, ds.StudyInstanceUID = "1.2.3.4", "1.2.3"
    ds.SeriesInstanceUID, ds.FrameOfReferenceUID = "01.2", "1.2.5"  # a leading zero is invalid
    derived = repair_identifiers(ds, "ab" * 32)
    assert [d.keyword for d in derived] == ["SeriesInstanceUID"]
    assert ds.SOPInstanceUID == "1.2.3.4" and ds.SeriesInstanceUID == derived_uid("SeriesInstanceUID", "01.2")
    assert is_valid_uid(ds.SeriesInstanceUID) and ds.PatientName == "" and ds.AccessionNumber == ""


def test_query_of_a_dicom_slice_writes_its_seg(phantom_dir, tiny_weights, tmp_path):
    store = ["--db", f"sqlite:///{tmp_path / 'db.sqlite'}", "--index-dir", tmp_path / "index",
             "--weights", tiny_weights]
    series = phantom_dir / "dicom" / "phantom02"
    assert invoke("index-dataset", series, "--quiet", *store).exit_code == 0
    image = sorted(find_image_files([series]))[2]
    result = invoke("query", image, "--k", "2", "--json", "--out", tmp_path / "out", *store)
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output.strip().splitlines()[0])
    assert answer["seg"] == str(tmp_path / "out" / f"{Path(image).stem}_seg.dcm")
    mask = cv2.imread(answer["mask"], cv2.IMREAD_UNCHANGED)
    assert np.array_equal(seg_frames(answer["seg"])[(source_z(image), 1)], mask > 0)
    assert referenced_sops(answer["seg"]) == [str(pydicom.dcmread(image).SOPInstanceUID)]


@pytest.mark.realdata
@pytest.mark.parametrize("patient", ["P001", "P002"])  # P002: empty SOP UIDs, UUID-text study/series UIDs
def test_real_series_seg_is_valid_and_equals_png_masks(shared_data, bundled_weights, tmp_path, patient):
    series = shared_data / "covid-ct-md" / "covid" / patient
    files = sorted(find_image_files([series]))
    result = invoke("segment", series, "--format", "dicom-seg", "--out", tmp_path / "seg",
                    "--weights", bundled_weights)
    assert result.exit_code == 0, result.output
    assert invoke("segment", series, "--out", tmp_path / "png", "--weights", bundled_weights).exit_code == 0
    seg_path = tmp_path / "seg" / f"{patient}_seg.dcm"
    assert_frames_equal_pngs(seg_path, files, tmp_path / "png")
    sops = referenced_sops(seg_path)
    assert len(set(sops)) == len(files) and all(is_valid_uid(uid) for uid in sops)
    messy = not is_valid_uid(str(pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID))
    assert ("derived" in pydicom.dcmread(seg_path).ContentDescription) == messy
    dciodvfy(seg_path)


def test_source_text_beyond_dicom_limits_is_fixed_up_recorded_and_valid(phantom_dir, tiny_weights, tmp_path):
    """A PatientName of 5,000 characters, a PatientID of 300 and non-ASCII text without a
    Specific Character Set break the SEG's limits; they are fixed up in the SEG, noted, and the
    SEG stays valid."""
    out = tmp_path / "long"
    out.mkdir()
    for path in sorted(find_image_files([phantom_dir / "dicom" / "phantom01"])):
        ds = pydicom.dcmread(path)
        if "SpecificCharacterSet" in ds:
            del ds.SpecificCharacterSet
        ds.PatientName = "Doe^" + "N" * 5000
        ds.PatientID = "P" * 300
        ds.ReferringPhysicianName = "Müller^Jürgen"
        ds.save_as(out / Path(path).name)
    result = invoke("segment", out, "--format", "dicom-seg", "--out", tmp_path / "seg", "--weights", tiny_weights)
    assert result.exit_code == 0, result.output
    seg_path = tmp_path / "seg" / "long_seg.dcm"
    dciodvfy(seg_path)
    seg = pydicom.dcmread(seg_path)
    assert len(str(seg.PatientID)) <= 64 and str(seg.PatientID).startswith("P" * 40)
    assert len(str(seg.PatientName)) <= 64
    assert "Müller" in str(seg.ReferringPhysicianName)  # kept, with a character set that says how
    assert "identifiers derived for 6 of 6" in result.output and "derived" in seg.ContentDescription
    note = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].DerivationDescription
    assert "PatientID was longer than LO allows (64)" in note and "SpecificCharacterSet" in note
