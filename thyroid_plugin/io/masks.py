"""Saliency masks written on exactly the grid of the frame they belong to, in its format.

PNG, BMP and TIFF frames get a mask of the same format, JPEG frames a PNG (lossless); NRRD and
NIfTI frames a file of the same kind and geometry; DICOM frames a single-frame Secondary Capture
image that keeps the patient, study, frame of reference and plane geometry of the source frame.
"""

from __future__ import annotations

import copy
import datetime
import io as _io
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .atomic import atomic_write_bytes
from .formats import PIL_FORMAT
from .image import LPS_FROM_RAS, PathLike, UltrasoundImage

__all__ = ["encode_mask", "write_mask"]


def write_mask(image: UltrasoundImage, mask: np.ndarray, path: PathLike) -> str:
    """Write a ``(H, W)`` uint8 mask on exactly ``image``'s grid, in ``image``'s format.

    PNG, BMP and TIFF frames get a mask of the same format, JPEG frames a PNG (lossless); NRRD and
    NIfTI frames a file of the same kind with the same size, spacing, origin and directions (a
    single-slice volume where the input was one); DICOM frames a single-frame DICOM image that
    keeps the patient, study, frame of reference and plane geometry of the source frame.

    Args:
        image: the frame the mask belongs to.
        mask: ``(H, W)`` array, cast to uint8.
        path: destination; its suffix should be :func:`mask_suffix` ``(image)``.

    Returns:
        the path written (atomically).
    """
    atomic_write_bytes(path, encode_mask(image, mask))
    return os.fspath(path)


def encode_mask(image: UltrasoundImage, mask: np.ndarray, as_nrrd: bool = False) -> bytes:
    """The bytes of the file :func:`write_mask` writes (for answers that never touch the disk
    durably, e.g. a mask streamed back in an HTTP response); with ``as_nrrd`` an NRRD file on
    the frame's grid whatever its format (what 3D Slicer reads, e.g. for an archive frame that
    the server read from DICOM)."""
    mask = np.asarray(mask)
    if mask.shape != image.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the image's {image.shape}")
    mask = mask.astype(np.uint8)
    fmt = image.format
    if as_nrrd and fmt != "nrrd":
        data = _encode_nrrd_on_grid(image, mask)
    elif fmt in PIL_FORMAT:
        data = _encode_raster(mask, "PNG" if fmt == "jpeg" else PIL_FORMAT[fmt])
    elif fmt == "nrrd":
        data = _encode_nrrd(image, mask)
    elif fmt == "nifti":
        data = _encode_nifti(image, mask)
    else:
        data = _encode_dicom(image, mask)
    return data


def _encode_raster(mask: np.ndarray, pil_format: str) -> bytes:
    from PIL import Image

    buf = _io.BytesIO()
    # a mask is mostly flat: the fastest PNG compression is within a few hundred bytes of the best
    options = {"compress_level": 1} if pil_format == "PNG" else {}
    Image.fromarray(mask, mode="L").save(buf, format=pil_format, **options)
    return buf.getvalue()


def _encode_nrrd_on_grid(image: UltrasoundImage, mask: np.ndarray) -> bytes:
    """A one-slice LPS NRRD of ``mask`` with the frame's spacing, origin and directions."""
    import nrrd

    header = {"type": "unsigned char", "encoding": "gzip", "kinds": ["domain"] * 3, "space": "left-posterior-superior",
              "space directions": np.asarray(image.affine[:3, :3], dtype=float).T,
              "space origin": np.asarray(image.affine[:3, 3], dtype=float)}
    data = mask.T[:, :, None]  # (i, j, k) in file order
    return _written_bytes(".nrrd", lambda name: nrrd.write(name, np.asfortranarray(data), header, index_order="F"))


def _encode_nrrd(image: UltrasoundImage, mask: np.ndarray) -> bytes:
    import nrrd

    src = image.header.get("nrrd", {})
    domain_axes = image.header.get("domain_axes", [0, 1, 2])
    n_domain = len(domain_axes)
    header: dict[str, Any] = {
        "type": "unsigned char",
        "encoding": "gzip",
        "kinds": ["domain"] * n_domain,
    }
    for key in ("space", "space origin", "space units", "measurement frame"):
        if key in src:
            header[key] = copy.deepcopy(src[key])
    if "space directions" in src:
        dirs = np.asarray(src["space directions"], dtype=float)
        header["space directions"] = dirs[domain_axes]
    if "space" not in header and "space dimension" in src:
        header["space dimension"] = src["space dimension"]
    data = mask.T  # (i, j) in file order
    if n_domain > 2:
        data = data.reshape(data.shape + (1,) * (n_domain - 2))
    return _written_bytes(".nrrd", lambda name: nrrd.write(name, np.asfortranarray(data), header, index_order="F"))


def _encode_nifti(image: UltrasoundImage, mask: np.ndarray) -> bytes:
    import nibabel as nib

    src_header = image.header.get("nifti")
    shape = image.header.get("shape", (mask.shape[1], mask.shape[0]))
    spatial = tuple(shape[:3]) if len(shape) >= 3 else tuple(shape[:2])
    if len(spatial) == 3 and spatial[2] != 1:
        spatial = spatial[:2] + (1,)
    data = mask.T.reshape(spatial)
    affine_ras = LPS_FROM_RAS @ image.affine
    out = nib.Nifti1Image(data, affine_ras)
    if src_header is not None:
        qform, qcode = src_header.get_qform(coded=True)
        sform, scode = src_header.get_sform(coded=True)
        out.set_qform(affine_ras if qform is None else qform, int(qcode) if qform is not None else 1)
        out.set_sform(affine_ras if sform is None else sform, int(scode) if sform is not None else 1)
        out.header.set_xyzt_units(*src_header.get_xyzt_units())
    out.set_data_dtype(np.uint8)
    return _written_bytes(".nii.gz", lambda name: nib.save(out, name))


def _written_bytes(suffix: str, write: Callable[[str], Any]) -> bytes:
    """The bytes that ``write(file_name)`` puts in a temporary ``*<suffix>`` file, which is
    removed after (pynrrd and nibabel write gzip-compressed files by name, not to a buffer; the
    suffix tells them the format)."""
    fd, name = tempfile.mkstemp(suffix=suffix)
    os.close(fd)
    try:
        write(name)
        return Path(name).read_bytes()
    finally:
        os.unlink(name)


def _encode_dicom(image: UltrasoundImage, mask: np.ndarray) -> bytes:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    src = image.header.get("dataset")
    ds = Dataset()
    keep = (
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
        "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "FrameOfReferenceUID",
        "Modality", "Laterality", "BodyPartExamined",
    )
    if src is not None:
        for name in keep:
            if name in src:
                setattr(ds, name, src.data_element(name).value)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyInstanceUID = getattr(ds, "StudyInstanceUID", generate_uid())
    ds.Modality = getattr(ds, "Modality", "US")
    ds.SeriesDescription = "Thyroid nodule saliency mask"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    now = datetime.datetime.now()
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    if src is not None and "SOPInstanceUID" in src:
        ref = Dataset()
        ref.ReferencedSOPClassUID = src.get("SOPClassUID", "")
        ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
        if int(src.get("NumberOfFrames", 1) or 1) > 1:
            ref.ReferencedFrameNumber = int(image.header.get("frame", 0)) + 1
        ds.SourceImageSequence = [ref]
    a = image.affine
    col_spacing, row_spacing = float(np.linalg.norm(a[:3, 0])), float(np.linalg.norm(a[:3, 1]))
    ds.PixelSpacing = [f"{row_spacing:.10g}", f"{col_spacing:.10g}"]
    ds.ImageOrientationPatient = [f"{v:.10g}" for v in list(a[:3, 0] / col_spacing) + list(a[:3, 1] / row_spacing)]
    ds.ImagePositionPatient = [f"{v:.10g}" for v in a[:3, 3]]
    ds.SliceThickness = f"{float(np.linalg.norm(a[:3, 2])):.10g}"
    ds.Rows, ds.Columns = int(mask.shape[0]), int(mask.shape[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(mask).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.is_little_endian, ds.is_implicit_VR = True, False
    buf = _io.BytesIO()
    pydicom.dcmwrite(buf, ds, write_like_original=False)
    return buf.getvalue()
