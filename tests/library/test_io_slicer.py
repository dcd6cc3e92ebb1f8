"""NRRD and NIfTI frames exactly as 3D Slicer writes them (slicer-core's MRML volume nodes and
archetype storage node), loaded with their geometry, and masks that Slicer reads back on the
same grid."""

from __future__ import annotations

import nibabel as nib
import nrrd
import numpy as np
import pytest
import slicer
from slicer import util as slicer_util

from thyroid_plugin.io import load_image, mask_suffix, write_mask

from .helpers import H, LPS_FROM_RAS, SPACING, W, ijk_to_ras, slicer_read, slicer_write


def _mask() -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[4:12, 6:25] = 255
    m[0, 0] = 9
    return m


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
def test_scalar_volume_written_by_slicer(tmp_path, suffix):
    frame = np.random.default_rng(0).integers(0, 256, (1, H, W), dtype=np.uint8)
    src = tmp_path / f"frame{suffix}"
    node_matrix = slicer_write(slicer.vtkMRMLScalarVolumeNode(), frame, src)
    image = load_image(src)
    assert image.format == ("nrrd" if suffix == ".nrrd" else "nifti")
    np.testing.assert_array_equal(image.array, frame[0])
    np.testing.assert_allclose(image.affine, LPS_FROM_RAS @ node_matrix, atol=1e-6)
    assert image.spacing == pytest.approx(SPACING)

    out = tmp_path / f"mask{mask_suffix(image)}"
    assert mask_suffix(image) == suffix
    write_mask(image, _mask(), out)
    # Slicer reads the mask back on exactly the frame's grid
    back = slicer_read(out)
    np.testing.assert_allclose(ijk_to_ras(back), node_matrix, atol=1e-6)
    np.testing.assert_array_equal(slicer_util.arrayFromVolume(back), _mask()[None])


def test_scalar_nrrd_mask_header(tmp_path):
    frame = np.random.default_rng(1).integers(0, 256, (1, H, W), dtype=np.uint8)
    src = tmp_path / "frame.nrrd"
    slicer_write(slicer.vtkMRMLScalarVolumeNode(), frame, src)
    source = nrrd.read_header(str(src))
    image = load_image(src)
    write_mask(image, _mask(), tmp_path / "mask.nrrd")
    data, header = nrrd.read(str(tmp_path / "mask.nrrd"))
    assert list(header["sizes"]) == list(source["sizes"]) == [W, H, 1]
    assert header["space"] == source["space"]
    np.testing.assert_allclose(header["space directions"], source["space directions"])
    np.testing.assert_allclose(header["space origin"], source["space origin"])
    np.testing.assert_array_equal(data[:, :, 0].T, _mask())


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
def test_rgb_volume_written_by_slicer(tmp_path, suffix):
    rgb = np.random.default_rng(2).integers(0, 256, (1, H, W, 3), dtype=np.uint8)
    src = tmp_path / f"rgb{suffix}"
    node_matrix = slicer_write(slicer.vtkMRMLVectorVolumeNode(), rgb, src)
    if suffix == ".nrrd":
        assert "RGB-color" in nrrd.read_header(str(src))["kinds"]
    else:
        assert nib.load(src).get_data_dtype().names == ("R", "G", "B")  # RGB24, as Slicer writes colour NIfTI
    image = load_image(src)
    assert image.array.shape == (H, W, 3)
    np.testing.assert_array_equal(image.array, rgb[0])
    np.testing.assert_allclose(image.affine, LPS_FROM_RAS @ node_matrix, atol=1e-6)

    out = tmp_path / f"mask{mask_suffix(image)}"
    write_mask(image, _mask(), out)  # a scalar mask on the colour frame's grid
    back = slicer_read(out)
    np.testing.assert_allclose(ijk_to_ras(back), node_matrix, atol=1e-6)
    np.testing.assert_array_equal(slicer_util.arrayFromVolume(back), _mask()[None])
