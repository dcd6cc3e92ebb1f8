"""Ultrasound DICOM objects as scanners send them, built from real thyroid frames with pydicom.

A patient/study/series hierarchy; US Image Storage (single frame) and US Multi-frame Image
Storage (cine clips); gray (MONOCHROME2) uncompressed, RGB uncompressed, and YBR_FULL_422 JPEG
baseline (Pillow's encoder with 4:2:2 chroma subsampling, one fragment per frame); a Sequence of
Ultrasound Regions with physical deltas in cm (and no Pixel Spacing, as most scanners write).
"""

from __future__ import annotations

import datetime
import io
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
from PIL import Image

US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


@dataclass
class Study:
    patient_id: str
    patient_name: str
    study_uid: str = ""
    accession: str = ""
    series: list = field(default_factory=list)

    def __post_init__(self) -> None:
        from pydicom.uid import generate_uid

        self.study_uid = self.study_uid or generate_uid()
        self.accession = self.accession or self.patient_id[-6:]


def region_sequence(width: int, height: int, delta_cm: tuple[float, float]):
    """One 2D B-mode region covering the frame; ``delta_cm`` = (x, y) cm per pixel."""
    from pydicom.dataset import Dataset

    r = Dataset()
    r.RegionSpatialFormat = 1  # 2D
    r.RegionDataType = 1  # tissue
    r.RegionFlags = 0
    r.RegionLocationMinX0, r.RegionLocationMinY0 = 0, 0
    r.RegionLocationMaxX1, r.RegionLocationMaxY1 = width - 1, height - 1
    r.PhysicalUnitsXDirection = 3  # cm
    r.PhysicalUnitsYDirection = 3
    r.PhysicalDeltaX, r.PhysicalDeltaY = float(delta_cm[0]), float(delta_cm[1])
    r.ReferencePixelX0, r.ReferencePixelY0 = 0, 0
    return [r]


def _jpeg(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    mode = "RGB" if frame.ndim == 3 else "L"
    # 4:2:2 chroma subsampling, as YBR_FULL_422 says
    Image.fromarray(frame, mode).save(buf, format="JPEG", quality=92, subsampling=1)
    return buf.getvalue()


def us_dataset(study: Study, series_uid: str, frames: Sequence[np.ndarray], number: int, *, jpeg: bool = False,
               delta_cm: tuple[float, float] = (0.0075, 0.008), series_number: int = 1,
               sop_uid: Optional[str] = None):
    """A US (multi-frame when several ``frames``) instance of ``study``; frames ``(H, W)`` or ``(H, W, 3)``."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import generate_uid

    frames = [np.ascontiguousarray(f, dtype=np.uint8) for f in frames]
    h, w = frames[0].shape[:2]
    rgb = frames[0].ndim == 3
    multi = len(frames) > 1
    ds = Dataset()
    ds.SOPClassUID = US_MULTIFRAME if multi else US_IMAGE
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.PatientName, ds.PatientID = study.patient_name, study.patient_id
    ds.PatientBirthDate, ds.PatientSex = "19700101", "F"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study.study_uid, series_uid
    today = datetime.date(2026, 11, 20)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = today.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.StudyID, ds.AccessionNumber = "1", study.accession
    ds.ReferringPhysicianName = "Referrer^Test"
    ds.Modality, ds.Manufacturer = "US", "TestScanner"
    ds.BodyPartExamined = "THYROID"
    ds.SeriesNumber, ds.InstanceNumber = series_number, number
    ds.SeriesDescription = "Thyroid cine" if multi else "Thyroid"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "", "0001"]
    ds.PatientOrientation = ""
    ds.Rows, ds.Columns = h, w
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 3 if rgb else 1
    if rgb:
        ds.PlanarConfiguration = 0
    ds.SequenceOfUltrasoundRegions = region_sequence(w, h, delta_cm)
    if multi:
        ds.NumberOfFrames = len(frames)
        ds.FrameTime = 40.0
        ds.FrameIncrementPointer = 0x00181063  # Frame Time
    if jpeg:
        ds.PhotometricInterpretation = "YBR_FULL_422" if rgb else "MONOCHROME2"
        ds.LossyImageCompression = "01"
        ds.PixelData = encapsulate([_jpeg(f) for f in frames])
        ds["PixelData"].VR = "OB"
        ts = JPEG_BASELINE
    else:
        ds.PhotometricInterpretation = "RGB" if rgb else "MONOCHROME2"
        ds.PixelData = b"".join(f.tobytes() for f in frames)
        ts = EXPLICIT_LE
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.is_little_endian, ds.is_implicit_VR = True, False
    return ds


def gray_frame(path) -> np.ndarray:
    return np.array(Image.open(path).convert("L"))


def rgb_frame(path) -> np.ndarray:
    """A colour frame from a gray one (a tinted B-mode, as some scanners export)."""
    g = gray_frame(path)
    return np.stack([g, (g * 0.85).astype(np.uint8), (g * 0.7).astype(np.uint8)], axis=-1)
