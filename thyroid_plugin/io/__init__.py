"""2D ultrasound frames in, with their geometry; masks out on the same grid.

- :mod:`.formats`: the accepted formats, their file-name suffixes (the project's one table), the
  image id of a file name, and detection of a file's format from its content;
- :mod:`.image`: :class:`UltrasoundImage` (pixels + LPS affine) and its network channels;
- :mod:`.readers` (with :mod:`.nrrd_reader`): :func:`load_image` for PNG, JPEG, BMP, TIFF,
  DICOM, NIfTI and NRRD, within the limits of :mod:`.bounded`;
- :mod:`.masks`: :func:`write_mask` / :func:`encode_mask` in the frame's own format and geometry;
- :mod:`.atomic`: writes that readers see whole or not at all.
"""

from .atomic import (
    PARTIAL_SUFFIX,
    StagedFile,
    atomic_copy_file,
    atomic_write_bytes,
    atomic_write_json,
    is_partial_file,
    json_safe,
    process_umask,
    stage_copy,
    sync_directory,
    transient_file,
)
from .bounded import DEFAULT_MAX_PIXELS
from .formats import (
    IMAGE_PATTERNS,
    IMAGE_SUFFIXES,
    MASK_SUFFIX,
    SUFFIXES,
    detect_format,
    image_id,
    image_suffix,
    mask_suffix,
)
from .image import PathLike, UltrasoundImage, to_network_channels
from .masks import encode_mask, write_mask
from .readers import load_image

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_PATTERNS",
    "IMAGE_SUFFIXES",
    "MASK_SUFFIX",
    "PARTIAL_SUFFIX",
    "PathLike",
    "SUFFIXES",
    "StagedFile",
    "UltrasoundImage",
    "atomic_copy_file",
    "atomic_write_bytes",
    "atomic_write_json",
    "detect_format",
    "encode_mask",
    "image_id",
    "image_suffix",
    "is_partial_file",
    "json_safe",
    "load_image",
    "mask_suffix",
    "process_umask",
    "stage_copy",
    "sync_directory",
    "to_network_channels",
    "transient_file",
    "write_mask",
]
