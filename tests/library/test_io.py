"""Reading 2D frames with their geometry and writing masks back on the same grid.

Every input file is written by the test itself; written masks are read back independently
(PIL, pydicom, nibabel, pynrrd), never with the library's own reader alone.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixel_data_handlers.util import convert_color_space
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from thyroid_plugin.errors import ImageTooLargeError, InvalidImageError
from thyroid_plugin.io import IMAGE_PATTERNS, IMAGE_SUFFIXES, MASK_SUFFIX, SUFFIXES, detect_format, image_id, image_suffix
from thyroid_plugin.io import load_image, mask_suffix, write_mask
from thyroid_plugin.io.formats import PIL_FORMAT

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
H, W = 20, 30  # deliberately not square, so a transposed axis shows


def _rng(seed=0):
    return np.random.default_rng(seed)


def _gray8(seed=0):
    return _rng(seed).integers(0, 256, (H, W), dtype=np.uint8)


def _rgb8(seed=0):
    return _rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _some_mask(shape=(H, W)) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[3:11, 5:22] = 255
    m[0, 0] = 7  # a corner pixel with its own value shows any flip
    return m


def _write_and_read_png_mask(image, tmp_path) -> np.ndarray:
    mask = _some_mask(image.shape)
    path = tmp_path / f"mask{mask_suffix(image)}"
    assert write_mask(image, mask, path) == str(path)
    with Image.open(path) as m:
        assert m.mode == "L" and m.size == (image.shape[1], image.shape[0])
        np.testing.assert_array_equal(np.array(m), mask)
        return np.array(m)


# ------------------------------------------------------------------------------------- raster
@pytest.mark.parametrize(
    "name, pil_format, make",
    [
        ("gray.png", "PNG", lambda: Image.fromarray(_gray8(), mode="L")),
        ("rgb.png", "PNG", lambda: Image.fromarray(_rgb8(), mode="RGB")),
        ("gray.bmp", "BMP", lambda: Image.fromarray(_gray8(), mode="L")),
        ("rgb.bmp", "BMP", lambda: Image.fromarray(_rgb8(), mode="RGB")),
        ("gray.tif", "TIFF", lambda: Image.fromarray(_gray8(), mode="L")),
        ("rgb.tif", "TIFF", lambda: Image.fromarray(_rgb8(), mode="RGB")),
    ],
)
def test_lossless_raster_round_trip(tmp_path, name, pil_format, make):
    source = make()
    path = tmp_path / name
    source.save(path, format=pil_format)
    image = load_image(path)
    expected = np.array(source)
    assert image.array.dtype == np.uint8
    np.testing.assert_array_equal(image.array, expected)
    assert image.shape == (H, W)
    np.testing.assert_array_equal(image.affine, np.eye(4))  # raster: 1 mm pixels at the origin
    assert image.spacing == (1.0, 1.0, 1.0) and image.origin == (0.0, 0.0, 0.0)
    assert image.format == {"PNG": "png", "BMP": "bmp", "TIFF": "tiff"}[pil_format]
    assert mask_suffix(image) == {"PNG": ".png", "BMP": ".bmp", "TIFF": ".tif"}[pil_format]
    _write_and_read_png_mask(image, tmp_path)
    with Image.open(tmp_path / f"mask{mask_suffix(image)}") as m:
        assert m.format == pil_format


def test_jpeg_rgb_round_trip(tmp_path):
    path = tmp_path / "frame.jpg"
    Image.fromarray(_rgb8(), "RGB").save(path, quality=95)
    image = load_image(path)
    with Image.open(path) as independent:
        np.testing.assert_array_equal(image.array, np.array(independent.convert("RGB")))
    assert image.format == "jpeg" and image.array.shape == (H, W, 3)
    assert mask_suffix(image) == ".png"  # a lossless mask for a lossy frame
    _write_and_read_png_mask(image, tmp_path)
    with Image.open(tmp_path / "mask.png") as m:
        assert m.format == "PNG"


def test_sixteen_bit_gray_tiff(tmp_path):
    data = _rng(1).integers(0, 65536, (H, W), dtype=np.uint16)
    path = tmp_path / "frame16.tif"
    Image.fromarray(data).save(path, format="TIFF")
    image = load_image(path)
    assert image.array.dtype == np.uint16
    np.testing.assert_array_equal(image.array, data)
    f = image.to_float()
    assert f.shape == (3, H, W) and f.min() == 0.0 and f.max() == 1.0  # scaled by the frame's range
    _write_and_read_png_mask(image, tmp_path)


def test_palette_png(tmp_path):
    index = _rng(2).integers(0, 4, (H, W), dtype=np.uint8)
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 128, 255], [40, 200, 60]], np.uint8)
    img = Image.fromarray(index, mode="P")
    img.putpalette(colours.ravel().tolist() + [0] * (768 - colours.size))
    path = tmp_path / "palette.png"
    img.save(path)
    image = load_image(path)
    np.testing.assert_array_equal(image.array, colours[index])  # the palette applied
    _write_and_read_png_mask(image, tmp_path)


def test_gray_palette_png_stays_gray(tmp_path):
    index = _gray8(3)
    img = Image.fromarray(index, mode="P")
    img.putpalette([v for i in range(256) for v in (255 - i,) * 3])  # an inverted gray ramp
    path = tmp_path / "graypalette.png"
    img.save(path)
    image = load_image(path)
    np.testing.assert_array_equal(image.array, 255 - index)


def test_gray_alpha_png_drops_the_alpha(tmp_path):
    gray, alpha = _gray8(4), _gray8(5)
    path = tmp_path / "la.png"
    Image.fromarray(np.stack([gray, alpha], axis=-1), mode="LA").save(path)
    image = load_image(path)
    np.testing.assert_array_equal(image.array, gray)
    _write_and_read_png_mask(image, tmp_path)


def test_format_is_detected_from_content_not_name(tmp_path):
    path = tmp_path / "really_a_png.jpg"
    Image.fromarray(_gray8(), "L").save(path, format="PNG")
    assert detect_format(path) == "png"
    image = load_image(path)
    assert image.format == "png"
    np.testing.assert_array_equal(image.array, _gray8())


def test_mask_must_match_the_frame(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(_gray8(), "L").save(path)
    with pytest.raises(ValueError, match="shape"):
        write_mask(load_image(path), np.zeros((W, H), np.uint8), tmp_path / "m.png")


# -------------------------------------------------------------------------------------- DICOM
COS30, SIN30 = np.cos(np.pi / 6), np.sin(np.pi / 6)
ORIENTATION = [COS30, SIN30, 0.0, 0.0, 0.0, -1.0]  # an oblique row direction, columns going down in z
PIXEL_SPACING = [0.4, 0.3]  # [row spacing, column spacing]
POSITION = [10.0, -20.0, 5.5]


def _dicom(path: Path, pixels: np.ndarray, photometric="MONOCHROME2", frames: int | None = None, **elements) -> Path:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"  # US image storage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.PatientName = "Test^Thyroid"
    ds.PatientID = "TP-001"
    ds.Modality = "US"
    colour = pixels.ndim == (4 if frames else 3)
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.Rows = pixels.shape[1 if frames else 0]
    ds.Columns = pixels.shape[2 if frames else 1]
    if frames:
        ds.NumberOfFrames = frames
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.save_as(path, write_like_original=False)
    return path


def _expected_dicom_affine(orientation, pixel_spacing, position) -> np.ndarray:
    # DICOM PS3.3 C.7.6.2.1.1: P(i, j) = S + X * dc * i + Y * dr * j, with X the row cosine
    # (first three values), dc the column spacing (PixelSpacing[1]), Y the column cosine, dr the row spacing
    x, y = np.array(orientation[:3]), np.array(orientation[3:])
    a = np.eye(4)
    a[:3, 0] = x * pixel_spacing[1]
    a[:3, 1] = y * pixel_spacing[0]
    a[:3, 3] = position
    return a


def test_dicom_monochrome2_geometry_and_mask(tmp_path):
    pixels = _rng(6).integers(0, 4096, (H, W), dtype=np.uint16)
    src = _dicom(tmp_path / "frame.dcm", pixels, PixelSpacing=PIXEL_SPACING, ImagePositionPatient=POSITION,
                 ImageOrientationPatient=ORIENTATION)
    image = load_image(src)
    assert image.format == "dicom"
    np.testing.assert_array_equal(image.array, pixels)
    expected = _expected_dicom_affine(ORIENTATION, PIXEL_SPACING, POSITION)
    np.testing.assert_allclose(image.affine[:3, [0, 1, 3]], expected[:3, [0, 1, 3]], atol=1e-9)
    assert image.spacing[:2] == pytest.approx((0.3, 0.4))
    # the world position of pixel (column 2, row 5)
    np.testing.assert_allclose((image.affine @ [2, 5, 0, 1])[:3], np.array(POSITION) + 2 * 0.3 * np.array(ORIENTATION[:3])
                               + 5 * 0.4 * np.array(ORIENTATION[3:]))

    mask = _some_mask()
    out = tmp_path / f"mask{mask_suffix(image)}"
    assert mask_suffix(image) == ".dcm"
    write_mask(image, mask, out)
    ds = pydicom.dcmread(out)
    source = pydicom.dcmread(src)
    assert (ds.Rows, ds.Columns) == (H, W)
    np.testing.assert_array_equal(ds.pixel_array, mask)
    np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], PIXEL_SPACING, rtol=1e-7)
    np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient], ORIENTATION, atol=1e-7)
    np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], POSITION, atol=1e-7)
    for keep in ("PatientID", "StudyInstanceUID", "FrameOfReferenceUID"):
        assert ds.data_element(keep).value == source.data_element(keep).value
    assert ds.SOPInstanceUID != source.SOPInstanceUID
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_dicom_monochrome1_is_inverted(tmp_path):
    pixels = _rng(7).integers(100, 3000, (H, W), dtype=np.uint16)
    m1 = load_image(_dicom(tmp_path / "m1.dcm", pixels, "MONOCHROME1"))
    m2 = load_image(_dicom(tmp_path / "m2.dcm", pixels, "MONOCHROME2"))
    # MONOCHROME1: the lowest value is white; the network sees the inverted frame
    np.testing.assert_allclose(m1.to_float(), 1.0 - m2.to_float(), atol=1e-6)
    assert m1.array[pixels == pixels.min()].min() == m1.array.max()


def test_dicom_rgb(tmp_path):
    rgb = _rgb8(8)
    image = load_image(_dicom(tmp_path / "rgb.dcm", rgb, "RGB", PixelSpacing=[0.2, 0.2]))
    np.testing.assert_array_equal(image.array, rgb)
    write_mask(image, _some_mask(), tmp_path / "mask.dcm")
    np.testing.assert_array_equal(pydicom.dcmread(tmp_path / "mask.dcm").pixel_array, _some_mask())


def test_dicom_ybr_full_is_converted_to_rgb(tmp_path):
    rgb = _rgb8(9)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    image = load_image(_dicom(tmp_path / "ybr.dcm", ybr, "YBR_FULL"))
    assert image.array.shape == (H, W, 3)
    assert np.abs(image.array.astype(int) - rgb.astype(int)).max() <= 2  # colour conversion rounding only


def _jpeg_baseline_dicom(path: Path, rgb: np.ndarray) -> bytes:
    """A JPEG-baseline YBR_FULL_422 DICOM, the usual encoding of ultrasound exports; returns the JPEG."""
    import io as _io

    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    buf = _io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, "JPEG", quality=95, subsampling=2)  # JFIF: YCbCr 4:2:2
    jpeg = buf.getvalue()
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.file_meta = meta
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.save_as(path, write_like_original=False)
    return jpeg


def test_dicom_jpeg_baseline_ybr_is_rgb(tmp_path):
    import io as _io

    yy, xx = np.mgrid[:64, :80]
    colour = np.stack([xx * 3, yy * 3, 255 - xx * 3], -1).clip(0, 255).astype(np.uint8)
    jpeg = _jpeg_baseline_dicom(tmp_path / "colour.dcm", colour)
    image = load_image(tmp_path / "colour.dcm")
    decoded = np.array(Image.open(_io.BytesIO(jpeg)).convert("RGB"))  # what any JPEG viewer shows
    assert image.array.shape == (64, 80, 3)
    assert np.abs(image.array.astype(int) - decoded.astype(int)).max() <= 2

    # a gray B-mode frame stays gray (a YCbCr array read as RGB would carry Cb = Cr = 128)
    gray = np.repeat(((xx + yy) * 1.5).clip(0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    _jpeg_baseline_dicom(tmp_path / "gray.dcm", gray)
    g = load_image(tmp_path / "gray.dcm").array.astype(int)
    assert np.abs(g[..., 0] - g[..., 1]).max() <= 2 and np.abs(g[..., 0] - g[..., 2]).max() <= 2
    assert np.abs(g[..., 0] - gray[..., 0]).max() <= 4


def test_dicom_spacing_from_ultrasound_regions(tmp_path):
    # ultrasound exports often give the pixel size only in the Sequence of Ultrasound Regions (cm)
    region = Dataset()
    region.PhysicalUnitsXDirection = 3
    region.PhysicalUnitsYDirection = 3
    region.PhysicalDeltaX = 0.012
    region.PhysicalDeltaY = 0.015
    path = _dicom(tmp_path / "us.dcm", _gray8(), SequenceOfUltrasoundRegions=[region])
    image = load_image(path)
    assert image.spacing[:2] == pytest.approx((0.12, 0.15))
    write_mask(image, _some_mask(), tmp_path / "mask.dcm")
    np.testing.assert_allclose([float(v) for v in pydicom.dcmread(tmp_path / "mask.dcm").PixelSpacing], [0.15, 0.12])


def test_dicom_multiframe_chosen_frame(tmp_path):
    frames = _rng(10).integers(0, 256, (4, H, W), dtype=np.uint8)
    path = _dicom(tmp_path / "cine.dcm", frames, frames=4, PixelSpacing=[0.5, 0.5])
    for f in range(4):
        np.testing.assert_array_equal(load_image(path, frame=f).array, frames[f])
    np.testing.assert_array_equal(load_image(path).array, frames[0])  # default: the first frame
    image = load_image(path, frame=2)
    write_mask(image, _some_mask(), tmp_path / "mask.dcm")
    ds = pydicom.dcmread(tmp_path / "mask.dcm")
    assert int(ds.get("NumberOfFrames", 1) or 1) == 1
    assert ds.SourceImageSequence[0].ReferencedFrameNumber == 3  # 1-based in DICOM
    with pytest.raises(InvalidImageError, match="frame 4"):
        load_image(path, frame=4)
    with pytest.raises(InvalidImageError, match="frame"):
        load_image(path, frame=-1)


def test_dicom_without_pixels(tmp_path):
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # a structured report
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = "X"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.save_as(tmp_path / "sr.dcm", write_like_original=False)
    with pytest.raises(InvalidImageError, match="no pixel data"):
        load_image(tmp_path / "sr.dcm")


# -------------------------------------------------------------------------------------- NIfTI
def _oblique_ras_affine() -> np.ndarray:
    a = np.eye(4)
    a[:3, 0] = [0.3 * COS30, 0.3 * SIN30, 0.0]
    a[:3, 1] = [0.0, 0.0, -0.45]
    a[:3, 2] = [1.5 * SIN30, -1.5 * COS30, 0.0]
    a[:3, 3] = [12.5, -7.25, 40.0]
    return a


@pytest.mark.parametrize("shape", [(W, H), (W, H, 1)], ids=["2d", "single-slice-3d"])
def test_nifti_round_trip(tmp_path, shape):
    frame = _gray8(11)  # array[row, column]; NIfTI stores data[i=column, j=row]
    affine = _oblique_ras_affine()
    src = tmp_path / "frame.nii.gz"
    nib.save(nib.Nifti1Image(frame.T.reshape(shape), affine), src)
    image = load_image(src)
    assert image.format == "nifti"
    np.testing.assert_array_equal(image.array, frame)
    np.testing.assert_allclose(image.affine, LPS_FROM_RAS @ affine, atol=1e-6)

    mask = _some_mask()
    out = tmp_path / f"mask{mask_suffix(image)}"
    assert mask_suffix(image) == ".nii.gz"
    write_mask(image, mask, out)
    written = nib.load(out)
    assert written.shape == shape
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(written.dataobj).reshape(W, H).T, mask)


def test_nifti_float_frame(tmp_path):
    frame = _rng(12).random((H, W)).astype(np.float32) * 500
    nib.save(nib.Nifti1Image(frame.T.copy(), np.eye(4)), tmp_path / "f.nii")
    image = load_image(tmp_path / "f.nii")
    np.testing.assert_allclose(image.array, frame)
    assert image.to_float().max() == pytest.approx(1.0) and image.to_float().min() == pytest.approx(0.0)


# --------------------------------------------------------------------------------------- NRRD
def test_nrrd_2d_written_by_pynrrd(tmp_path):
    frame = _gray8(13)
    header = {"space": "left-posterior-superior", "space directions": np.array([[0.25, 0.0, 0.0], [0.0, 0.0, -0.5]]),
              "space origin": np.array([5.0, 6.0, 7.0]), "kinds": ["domain", "domain"]}
    nrrd.write(str(tmp_path / "f.nrrd"), frame.T.copy(), header)
    image = load_image(tmp_path / "f.nrrd")
    np.testing.assert_array_equal(image.array, frame)
    np.testing.assert_allclose(image.affine[:3, 0], [0.25, 0, 0])
    np.testing.assert_allclose(image.affine[:3, 1], [0, 0, -0.5])
    np.testing.assert_allclose(image.affine[:3, 3], [5, 6, 7])
    write_mask(image, _some_mask(), tmp_path / "m.nrrd")
    data, h = nrrd.read(str(tmp_path / "m.nrrd"))
    np.testing.assert_array_equal(data.T, _some_mask())
    np.testing.assert_allclose(h["space directions"], header["space directions"])
    np.testing.assert_allclose(h["space origin"], header["space origin"])


# ---------------------------------------------------------------------------------- bad input
def _png_with_header(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR declares ``width x height`` (the pixel data is a few bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_empty_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InvalidImageError, match="empty"):
        load_image(tmp_path / "empty.png")


def test_truncated_png(tmp_path):
    full = tmp_path / "full.png"
    Image.fromarray(_rng(14).integers(0, 256, (64, 64), dtype=np.uint8)).save(full)
    data = full.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidImageError, match="PNG") as info:
        load_image(tmp_path / "cut.png")
    assert "\n" not in str(info.value)


def test_text_file(tmp_path):
    (tmp_path / "notes.png").write_text("file,label\nx.png,benign\n")
    with pytest.raises(InvalidImageError, match="not a supported image"):
        load_image(tmp_path / "notes.png")


def test_missing_file(tmp_path):
    with pytest.raises(InvalidImageError, match="cannot read"):
        load_image(tmp_path / "nothing.png")


def test_3d_nrrd_volume(tmp_path):
    nrrd.write(str(tmp_path / "vol.nrrd"), np.zeros((W, H, 3), np.uint8))
    with pytest.raises(InvalidImageError, match="single 2D frame"):
        load_image(tmp_path / "vol.nrrd")


def test_3d_nifti_volume(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((W, H, 4), np.uint8), np.eye(4)), tmp_path / "vol.nii.gz")
    with pytest.raises(InvalidImageError, match="single 2D frame"):
        load_image(tmp_path / "vol.nii.gz")


def test_huge_declared_size_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_with_header(100_000, 100_000))
    assert path.stat().st_size < 200
    with pytest.raises(ImageTooLargeError):
        load_image(path)


def test_size_limit_is_checked_from_the_header(tmp_path):
    # 7000 x 7000 = 49 M pixels: over the default 40 M limit, under Pillow's own bomb threshold
    path = tmp_path / "big.png"
    path.write_bytes(_png_with_header(7000, 7000))
    with pytest.raises(ImageTooLargeError, match="limit"):
        load_image(path)
    small = tmp_path / "small.png"
    Image.fromarray(_gray8(), "L").save(small)
    with pytest.raises(ImageTooLargeError):
        load_image(small, max_pixels=H * W - 1)
    assert load_image(small, max_pixels=H * W).shape == (H, W)


def test_huge_dicom_is_refused_from_its_header(tmp_path):
    path = _dicom(tmp_path / "big.dcm", np.zeros((16, 16), np.uint8))
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 50_000, 50_000  # the header lies; the pixel data is tiny
    ds.save_as(path)
    with pytest.raises(ImageTooLargeError):
        load_image(path)


@pytest.mark.parametrize("shape", [(4, 40), (40, 7), (1, 1)])
def test_too_small_frame(tmp_path, shape):
    Image.fromarray(np.zeros(shape, np.uint8)).save(tmp_path / "tiny.png")
    with pytest.raises(InvalidImageError, match="at least 8x8"):
        load_image(tmp_path / "tiny.png")


def test_error_messages_are_one_line(tmp_path):
    cases = {"empty.png": b"", "text.dcm": b"hello\nworld\n", "cut.png": _png_with_header(64, 64)[:40]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InvalidImageError) as info:
            load_image(tmp_path / name)
        assert str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------ the one table of suffixes
def _write_frame(path: Path, fmt: str, frame: np.ndarray) -> None:
    """``frame`` saved in ``fmt`` by the format's own library, under ``path`` whatever its suffix."""
    if fmt in PIL_FORMAT:
        Image.fromarray(frame, mode="L").save(path, format=PIL_FORMAT[fmt])
    elif fmt == "dicom":
        _dicom(path, frame)
    elif fmt == "nifti":  # nibabel compresses by the name: .nii.gz is gzip, .nii is not
        nib.save(nib.Nifti1Image(frame.T, np.eye(4)), path)
    else:
        nrrd.write(str(path), frame.T, {"space": "left-posterior-superior"})


@pytest.mark.parametrize("suffix", IMAGE_SUFFIXES + tuple(s.upper() for s in IMAGE_SUFFIXES))
def test_every_accepted_suffix_round_trips(tmp_path, suffix):
    fmt = next(f for f, suffixes in SUFFIXES.items() if suffix.lower() in suffixes)
    src = tmp_path / f"case 7.b{suffix}"
    frame = _gray8(20)
    _write_frame(src, fmt, frame)
    assert image_suffix(src) == suffix.lower()
    assert image_id(src) == image_id(str(src)) == "case 7.b"
    image = load_image(src)
    assert image.format == detect_format(src) == fmt
    error = np.abs(image.array.astype(int) - frame)
    assert (error.mean() < 8) if fmt == "jpeg" else not error.any()  # JPEG is lossy
    mask = _some_mask()
    out = tmp_path / f"{image_id(src)}_saliency{mask_suffix(image)}"
    write_mask(image, mask, out)
    assert mask_suffix(image) == MASK_SUFFIX[fmt] and image_suffix(out) == MASK_SUFFIX[fmt]
    assert image_id(out) == "case 7.b_saliency"
    written = load_image(out)
    assert written.format == ("png" if fmt == "jpeg" else fmt)  # a JPEG frame's mask is lossless
    np.testing.assert_array_equal(written.array, mask)
    np.testing.assert_allclose(written.affine, image.affine)


def test_image_ids_and_suffixes_of_names():
    assert image_id("x.nii.gz") == "x" and image_id("/data/x.NII.GZ") == "x" and image_id("x.nii") == "x"
    assert image_id("a.b.tiff") == "a.b" and image_id("ddti_12_1.png") == "ddti_12_1"
    assert image_id("notes.txt") == "notes" and image_id("archive.tar.gz") == "archive.tar"  # not an image suffix
    assert image_id(".nii.gz") == ".nii" and image_suffix(".nii.gz") == ""  # a suffix alone is no image id
    assert image_suffix("x.gz") == "" and image_suffix("x.JPEG") == ".jpeg"
    assert IMAGE_PATTERNS == tuple(f"*{s}" for s in IMAGE_SUFFIXES)
    assert len(set(IMAGE_SUFFIXES)) == len(IMAGE_SUFFIXES) == sum(len(v) for v in SUFFIXES.values())
    assert MASK_SUFFIX == {"png": ".png", "jpeg": ".png", "bmp": ".bmp", "tiff": ".tif", "dicom": ".dcm",
                           "nifti": ".nii.gz", "nrrd": ".nrrd"}  # JPEG frames get a lossless mask
    assert all(image_suffix(f"m{s}") == s for s in MASK_SUFFIX.values())  # every mask is an accepted image
