"""A synthetic chest CT phantom: clearly artificial slices with known lung masks.

It exists so that the quick start, the examples and the tests can run without any patient
data. The slices are simple ellipses in Hounsfield units (body, two lungs with vessels, spine,
table), written as DICOM series (HU via RescaleIntercept) and as 8-bit lung-window PNGs.
They are **synthetic**; never use them to judge accuracy on real scans.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np


@dataclass
class PhantomSlice:
    hu: np.ndarray  # int16 Hounsfield units
    mask: np.ndarray  # uint8 {0, 1} lungs
    level: float  # 0 = apex, 1 = base


def phantom_slice(level: float, size: int = 256, seed: int = 0) -> PhantomSlice:
    """One synthetic axial slice at relative height ``level`` (0 = lung apex, 1 = base).

    Example:
        >>> s = phantom_slice(0.5, size=64)
        >>> s.hu.shape, bool(s.mask.any())
        ((64, 64), True)
    """
    rng = np.random.default_rng(seed)
    scale = size / 256
    hu = np.full((size, size), -1000, np.float32)
    centre = (size // 2, int(size * 0.52))
    cv2.ellipse(hu, centre, (int(110 * scale), int(80 * scale)), 0, 0, 360, 40, -1)  # body
    lungs = np.zeros((size, size), np.uint8)
    # lungs grow from apex to mid level and shrink again towards the diaphragm
    extent = np.sin(np.pi * (0.15 + 0.8 * level))
    for side in (-1, 1):
        lung_centre = (size // 2 + side * int(48 * scale), int(size * 0.5))
        axes = (max(2, int(34 * scale * extent)), max(2, int(58 * scale * extent)))
        cv2.ellipse(lungs, lung_centre, axes, side * 8, 0, 360, 1, -1)
    hu[lungs > 0] = -850
    for _ in range(int(12 * extent) + 2):  # vessels inside the lungs
        ys, xs = np.nonzero(lungs)
        if len(ys) == 0:
            break
        pick = rng.integers(len(ys))
        cv2.circle(hu, (int(xs[pick]), int(ys[pick])), max(1, int(2 * scale)), 30, -1)
    cv2.ellipse(hu, (size // 2, int(size * 0.52)), (int(16 * scale), int(24 * scale)), 0, 0, 360, 60, -1)
    cv2.circle(hu, (size // 2, int(size * 0.78)), int(12 * scale), 700, -1)  # vertebra
    cv2.rectangle(hu, (int(size * 0.1), int(size * 0.92)), (int(size * 0.9), int(size * 0.95)), 200, -1)
    hu += rng.normal(0, 15, hu.shape).astype(np.float32)
    return PhantomSlice(np.clip(hu, -1024, 3071).astype(np.int16), lungs, level)


def write_phantom(out: str | os.PathLike, slices: int = 12, size: int = 256, patients: int = 2) -> list[Path]:
    """Write ``patients`` synthetic series as DICOM and PNG, with lung masks; returns the folders."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    out = Path(out)
    written = []
    for patient in range(patients):
        name = f"phantom{patient + 1:02d}"
        dicom_dir, png_dir, mask_dir = out / "dicom" / name, out / "png" / name, out / "masks" / name
        for folder in (dicom_dir, png_dir, mask_dir):
            folder.mkdir(parents=True, exist_ok=True)
        study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
        for index in range(slices):
            level = index / max(1, slices - 1)
            item = phantom_slice(level, size, seed=patient * 1000 + index)
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            # an in-memory dataset: pydicom accepts no file (None) at run time, its hints do not
            ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)  # type: ignore[arg-type]
            ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
            ds.Modality, ds.PatientID, ds.PatientName = "CT", name.upper(), "SYNTHETIC^PHANTOM"
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference, ""
            # the Type 2 patient and study attributes a real CT carries (empty where unknown)
            ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName = "", "O", ""
            ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20000101", "120000", "1", ""
            ds.SeriesNumber = 1
            ds.SeriesDescription = "SYNTHETIC PHANTOM - NOT PATIENT DATA"
            ds.InstanceNumber = index + 1
            ds.ImagePositionPatient = [0.0, 0.0, -10.0 * index]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.SliceLocation = -10.0 * index
            ds.PixelSpacing = [0.7, 0.7]
            ds.SliceThickness = 10.0
            ds.Rows = ds.Columns = size
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
            ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
            ds.PixelData = (item.hu.astype(np.int32) + 1024).astype(np.uint16).tobytes()
            # file names deliberately unrelated to slice order, as in real archives
            ds.save_as(dicom_dir / f"IMG{(index * 7919) % 10007:05d}.dcm", enforce_file_format=True)
            window = np.clip((item.hu.astype(np.float32) + 1000) / 1400, 0, 1)
            cv2.imwrite(str(png_dir / f"{name}_s{index:03d}.png"), np.round(window * 255).astype(np.uint8))
            cv2.imwrite(str(mask_dir / f"{name}_s{index:03d}.png"), item.mask * 255)
        written.append(out / "dicom" / name)
    return written
