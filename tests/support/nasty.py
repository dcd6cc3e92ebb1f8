"""The corpus of hostile and broken files in ``tests/data/nasty/`` and what the server must answer.

Every file is small (a few kB at most) and is made from real DDTI frames or by hand here:
decompression bombs (headers that claim gigapixels, gzip streams that would expand to hundreds
of megabytes), truncated and corrupted files, wrong magic numbers, files that look like one
format and are another, a NRRD header that names a data file elsewhere on the server, and a PNG
that carries a ZIP archive with ``../`` paths (harmless here: nothing is ever extracted).

``EXPECTED`` maps each file to the status ``POST /infer/classify_nodule`` must answer; the same
files offered to ``PUT /datastore/image`` and ``PUT /datastore/label`` must get a ``4xx`` unless
the file is a valid image (``200``). ``NASTY_NAMES`` are upload file names that must never reach
a file system call.

Run ``.venv/bin/python -m tests.support.nasty`` to write the corpus again (deterministic).
"""

from __future__ import annotations

import gzip
import io
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .images import _png_chunk, write_png_bomb
from .paths import DDTI, REPO

NASTY_DIR = REPO / "tests" / "data" / "nasty"

#: file name -> status of POST /infer/classify_nodule
EXPECTED = {
    "png_bomb_100000x100000.png": 413,
    "png_bomb_8000x8000.png": 413,
    "png_truncated.png": 400,
    "png_corrupt_idat.png": 400,
    "png_header_only.png": 400,
    "png_3x3_too_small.png": 400,
    "png_zip_polyglot_zip_slip.png": 200,
    "text_named_png.png": 400,
    "empty.png": 400,
    "jpeg_truncated.jpg": 400,
    "jpeg_sof_65500x65500.jpg": 413,
    "bmp_header_100000x100000.bmp": 413,
    "tiff_ifd_100000x100000.tif": 413,
    "nrrd_sizes_100000x100000.nrrd": 413,
    "nrrd_gzip_bomb_double_10000x10000.nrrd": 413,
    "nrrd_negative_size.nrrd": 400,
    "nrrd_sizes_overflow.nrrd": 413,
    "nrrd_data_file_outside.nrrd": 400,
    "nrrd_volume_5_slices.nrrd": 400,
    "nrrd_truncated_data.nrrd": 400,
    "nifti_dims_30000x30000.nii": 413,
    "nifti_gz_bomb_float64_6000x6000.nii.gz": 413,
    "gzip_of_text.nii.gz": 400,
    "dicom_rows_cols_65535.dcm": 413,
    "dicom_no_pixel_data.dcm": 400,
    "dicom_truncated.dcm": 400,
    "dicom_preamble_only.dcm": 400,
    "random_bytes.bin": 400,
}

#: upload file names a client may send (as bytes of the multipart header, decoded as UTF-8 here)
NASTY_NAMES = [
    "../../../../tmp/evil.png",
    "..\\..\\..\\windows\\evil.png",
    "/etc/passwd",
    "/etc/cron.d/evil.png",
    "a\x00b.png",
    "nul\x00.nrrd",
    "x" * 300 + ".png",
    "a" + ".x" * 200,
    "....png",
    "..",
    ".",
    "",
    "evil.sh",
    "x.png/../../y.png",
    "datastore_v2.json",
    ".lock",
    "labels/final/other.png",
    "%2e%2e%2fevil.png",
    "\u202eevil\u202dgnp.png",
    "con.png",
    " leading space.png",
]


def _real_png() -> bytes:
    return (DDTI / "images" / "10_1.png").read_bytes()


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _nrrd(header: str, data: bytes = b"") -> bytes:
    return ("NRRD0004\n" + header.strip() + "\n\n").encode() + data


def _nifti_header(dims, datatype: int, bitpix: int, vox_offset: float = 352.0) -> bytes:
    hdr = bytearray(348)
    struct.pack_into("<i", hdr, 0, 348)
    dim = [len(dims)] + list(dims) + [1] * (7 - len(dims))
    struct.pack_into("<8h", hdr, 40, *dim)
    struct.pack_into("<h", hdr, 70, datatype)
    struct.pack_into("<h", hdr, 72, bitpix)
    struct.pack_into("<8f", hdr, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into("<f", hdr, 108, vox_offset)
    struct.pack_into("<f", hdr, 112, 1.0)  # scl_slope
    hdr[344:348] = b"n+1\x00"
    return bytes(hdr) + b"\x00" * 4


def _dicom(rows: int, cols: int, pixel_bytes: bytes = None, with_pixels: bool = True, **elements) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"  # ultrasound image storage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["nasty", str(rows), str(cols)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.PatientName = "Nasty^Corpus"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    for name, value in elements.items():
        setattr(ds, name, value)
    if with_pixels:
        ds.PixelData = pixel_bytes if pixel_bytes is not None else b"\x00" * 64
    ds.is_little_endian, ds.is_implicit_VR = True, False  # pydicom 2
    buf = io.BytesIO()
    ds.save_as(buf, write_like_original=False)
    return buf.getvalue()


def corpus() -> dict:
    """File name -> bytes of every file of the corpus."""
    real = _real_png()
    files: dict = {}
    tmp = io.BytesIO()
    files["png_bomb_100000x100000.png"] = None  # written by write_png_bomb below
    # a PNG whose header claims 8000 x 8000 (64 Mpx > 40 Mpx limit) with a few rows of data
    header = struct.pack(">IIBBBBB", 8000, 8000, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\x00" * 8001 * 16, 9)
    files["png_bomb_8000x8000.png"] = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", body)
                                       + _png_chunk(b"IEND", b""))
    files["png_truncated.png"] = real[: int(len(real) * 0.4)]
    corrupt = bytearray(real)
    idat = corrupt.find(b"IDAT")
    for i in range(idat + 40, idat + 400, 7):
        corrupt[i] ^= 0xA5
    files["png_corrupt_idat.png"] = bytes(corrupt)
    files["png_header_only.png"] = real[:33]
    files["png_3x3_too_small.png"] = _png(np.full((3, 3), 128, np.uint8))
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        for name, text in [("../../../../tmp/zip-slip-evil.sh", "echo owned\n"),
                           ("/etc/cron.d/evil", "* * * * * root echo owned\n")]:
            z.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), text)  # fixed time: same bytes
    small = _png((np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) % 251).astype(np.uint8))
    files["png_zip_polyglot_zip_slip.png"] = small + zbuf.getvalue()
    files["text_named_png.png"] = b"this is not an image, just text that says it is a PNG\n"
    files["empty.png"] = b""
    files["jpeg_truncated.jpg"] = _jpeg()[:300]
    files["jpeg_sof_65500x65500.jpg"] = _jpeg_huge_sof()
    files["bmp_header_100000x100000.bmp"] = (b"BM" + struct.pack("<IHHI", 1000, 0, 0, 54)
                                             + struct.pack("<IiiHHIIiiII", 40, 100000, 100000, 1, 8, 0, 0, 2835, 2835, 0, 0)
                                             + b"\x00" * 64)
    files["tiff_ifd_100000x100000.tif"] = _tiff_huge()
    files["nrrd_sizes_100000x100000.nrrd"] = _nrrd("type: uint8\ndimension: 2\nsizes: 100000 100000\nencoding: raw")
    bomb = gzip.compress(b"\x00" * (1 << 20), 9, mtime=0)  # the first MB of 800 MB of zeros
    files["nrrd_gzip_bomb_double_10000x10000.nrrd"] = _nrrd(
        "type: double\ndimension: 3\nsizes: 10000 10000 1\nencoding: gzip\nspace: left-posterior-superior\n"
        "space directions: (1,0,0) (0,1,0) (0,0,1)", bomb)
    files["nrrd_negative_size.nrrd"] = _nrrd("type: uint8\ndimension: 2\nsizes: -64 64\nencoding: raw", b"\x00" * 64)
    files["nrrd_sizes_overflow.nrrd"] = _nrrd("type: uint8\ndimension: 2\nsizes: 4294967296 4294967296\nencoding: raw")
    files["nrrd_data_file_outside.nrrd"] = _nrrd("type: uint8\ndimension: 2\nsizes: 16 16\nencoding: raw\n"
                                                 "byte skip: -1\ndata file: /etc/hostname")
    files["nrrd_volume_5_slices.nrrd"] = _nrrd("type: uint8\ndimension: 3\nsizes: 16 16 5\nencoding: raw",
                                               bytes(16 * 16 * 5))
    files["nrrd_truncated_data.nrrd"] = _nrrd("type: uint8\ndimension: 2\nsizes: 64 64\nencoding: raw", bytes(100))
    files["nifti_dims_30000x30000.nii"] = _nifti_header((30000, 30000), datatype=2, bitpix=8)
    files["nifti_gz_bomb_float64_6000x6000.nii.gz"] = gzip.compress(
        _nifti_header((6000, 6000), datatype=64, bitpix=64) + b"\x00" * (1 << 20), 9, mtime=0)
    files["gzip_of_text.nii.gz"] = gzip.compress(b"hello, this is text and not a NIfTI header\n" * 20, 9, mtime=0)
    files["dicom_rows_cols_65535.dcm"] = _dicom(65535, 65535)
    files["dicom_no_pixel_data.dcm"] = _dicom(64, 64, with_pixels=False)
    files["dicom_truncated.dcm"] = _dicom(64, 64, bytes(64 * 64))[:400]
    files["dicom_preamble_only.dcm"] = b"\x00" * 128 + b"DICM"
    rng = np.random.default_rng(1234)
    files["random_bytes.bin"] = rng.integers(0, 256, 2048, dtype=np.uint8).tobytes()
    del tmp
    return files


def _jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) % 256).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _jpeg_huge_sof() -> bytes:
    """A real small JPEG whose frame header (SOF0) claims 65500 x 65500 pixels."""
    data = bytearray(_jpeg())
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, 65500, 65500)
    return bytes(data)


def _tiff_huge() -> bytes:
    """A little-endian TIFF whose only IFD claims 100000 x 100000 8-bit pixels in one strip."""
    entries = [(256, 4, 1, 100000), (257, 4, 1, 100000), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8 + 2 + 12 * 9 + 4), (277, 3, 1, 1), (278, 4, 1, 100000), (279, 4, 1, 64)]
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        ifd += struct.pack("<HHI", tag, typ, count) + (struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value))
    ifd += struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 64


def write_corpus(folder: Path = NASTY_DIR) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in corpus().items():
        path = folder / name
        if data is None:
            write_png_bomb(path)
        else:
            path.write_bytes(data)
        written.append(path)
    return written


#: generated payload name -> status of POST /infer/classify_nodule (built in memory by
#: :func:`generated_payloads`, never committed: one of them is a 6000 x 6000 frame)
GENERATED_EXPECTED = {
    "nrrd_line_skip_1e12.nrrd": 400,
    "nrrd_byte_skip_past_end.nrrd": 400,
    "nrrd_raw_sizes_beyond_file.nrrd": 400,
    "nrrd_bzip2_bomb_16MiB.nrrd": 413,
    "nrrd_gzip_bomb_16MiB.nrrd": 413,
    "dicom_deflated_bomb_256MiB.dcm": 413,
    "nrrd_zero_directions.nrrd": 400,
    "nrrd_nan_origin.nrrd": 400,
    "dicom_zero_pixel_spacing.dcm": 400,
    "nifti_zero_sform.nii": 400,
    "nifti_nan_sform.nii": 400,
    "png_6000x6000.png": 200,
}


def generated_payloads(include_large_frame: bool = True) -> dict:
    """Name -> bytes of the payloads of :data:`GENERATED_EXPECTED` (second round of issue 17:
    header fields that drive work, compressed bombs, non-finite or singular geometry, a large
    allowed frame). Deterministic; about a second to build."""
    import bz2

    head = "type: uint8\ndimension: 2\nsizes: 64 64\n"
    out = {
        "nrrd_line_skip_1e12.nrrd": _nrrd(head + "encoding: raw\nline skip: 1000000000000", bytes(4096)),
        "nrrd_byte_skip_past_end.nrrd": _nrrd(head + "encoding: raw\nbyte skip: 1000000000000", bytes(4096)),
        "nrrd_raw_sizes_beyond_file.nrrd": _nrrd("type: uint8\ndimension: 2\nsizes: 4000 4000\nencoding: raw",
                                                 bytes(4096)),
        "nrrd_bzip2_bomb_16MiB.nrrd": _nrrd(head + "encoding: bzip2", bz2.compress(bytes(16 << 20), 9)),
        "nrrd_gzip_bomb_16MiB.nrrd": _nrrd(head + "encoding: gzip", gzip.compress(bytes(16 << 20), 9, mtime=0)),
        "dicom_deflated_bomb_256MiB.dcm": _deflated_dicom_bomb(256 << 20),
        "nrrd_zero_directions.nrrd": _nrrd(head + "encoding: raw\nspace: left-posterior-superior\n"
                                           "space directions: (0,0,0) (0,0,0)\nspace origin: (0,0,0)", bytes(4096)),
        "nrrd_nan_origin.nrrd": _nrrd(head + "encoding: raw\nspace: left-posterior-superior\n"
                                      "space directions: (1,0,0) (0,1,0)\nspace origin: (nan,0,0)", bytes(4096)),
        "dicom_zero_pixel_spacing.dcm": _dicom(64, 64, bytes(64 * 64), PixelSpacing=[0, 0]),
        "nifti_zero_sform.nii": _nifti_with_sform(np.zeros((4, 4))),
        "nifti_nan_sform.nii": _nifti_with_sform(np.diag([np.nan, 1.0, 1.0, 1.0])),
    }
    if include_large_frame:
        frame = np.zeros((6000, 6000), np.uint8)
        frame[::7] = 200  # 35 kB as PNG, 36 megapixels decoded (under the 40 Mpx limit)
        out["png_6000x6000.png"] = _png(frame)
    return out


def _nifti_with_sform(sform: np.ndarray) -> bytes:
    hdr = bytearray(_nifti_header((64, 64, 1), datatype=2, bitpix=8))
    struct.pack_into("<h", hdr, 254, 1)  # sform_code: scanner
    struct.pack_into("<12f", hdr, 280, *np.asarray(sform, dtype=np.float32)[:3].ravel())
    return bytes(hdr) + bytes(64 * 64)


def _deflated_dicom_bomb(n_bytes: int) -> bytes:
    """A Deflated Explicit VR Little Endian file: a 64 x 64 frame followed by a private element of
    ``n_bytes`` zeros, about 1/1000 of that once deflated (deflated here in 1 MB steps)."""
    import zlib

    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    plain = _dicom(64, 64, bytes(64 * 64))  # explicit VR little endian, with its file meta
    meta_end = 132 + 12 + struct.unpack_from("<I", plain, 140)[0]  # (0002,0000) group length
    meta = io.BytesIO()
    from pydicom.dataset import FileMetaDataset

    info = FileMetaDataset()
    info.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"
    info.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7"
    info.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    write_file_meta_info(meta, info, enforce_standard=True)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = [packer.compress(plain[meta_end:])]
    body.append(packer.compress(struct.pack("<HH2sHI", 0x7FE1, 0x1010, b"OB", 0, n_bytes)))
    zeros = bytes(1 << 20)
    for _ in range(n_bytes >> 20):
        body.append(packer.compress(zeros))
    body.append(packer.flush())
    return b"\x00" * 128 + b"DICM" + meta.getvalue() + b"".join(body)


def nasty_files() -> list[Path]:
    """The committed corpus files, in ``EXPECTED`` order."""
    return [NASTY_DIR / name for name in EXPECTED]


if __name__ == "__main__":
    for p in write_corpus():
        print(f"{p.stat().st_size:8d}  {p.relative_to(REPO)}")
    sys.exit(0)
