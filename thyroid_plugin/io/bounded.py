"""Limits on what a decoder may be made to do, checked before (or while) pixels are decoded:
frame size from the header, decoded bytes, and compressed streams unpacked in bounded steps so a
decompression bomb is found after at most the allowed size.
"""

from __future__ import annotations

import bz2
import math
import zlib

from ..errors import ImageTooLargeError, InvalidImageError

__all__ = ["BYTES_PER_PIXEL", "DECODE_SLACK", "DEFAULT_MAX_PIXELS", "bounded_decompress", "check_bytes",
           "check_size", "count_values"]

#: largest frame accepted (width x height x frames), checked before any pixel is decoded.
DEFAULT_MAX_PIXELS = 40_000_000


def check_size(n_pixels: int, max_pixels: int, what: str = "image") -> None:
    """Refuse a frame of more than ``max_pixels`` pixels (:class:`ImageTooLargeError`)."""
    if n_pixels > max_pixels:
        raise ImageTooLargeError(f"the {what} has {n_pixels} pixels, more than the limit of {max_pixels}")


#: decoded pixel data may take at most this many bytes per allowed pixel (``max_pixels``): 160 MB
#: at the default, enough for the largest RGB or 32-bit frame, not for a compressed volume of
#: 64-bit values that claims few enough pixels
BYTES_PER_PIXEL = 4


def check_bytes(n_bytes: int, max_pixels: int) -> None:
    """Refuse, from the header, data whose decoded size exceeds the limit (a small compressed
    file that would expand to gigabytes)."""
    limit = BYTES_PER_PIXEL * max_pixels
    if n_bytes > limit:
        raise ImageTooLargeError(f"the image would take {n_bytes / 1e6:.0f} MB once decoded, more than the limit of "
                                 f"{limit / 1e6:.0f} MB")


def count_values(shape) -> int:
    """Number of values of an array shape read from a header (Python integers: no overflow)."""
    shape = [int(s) for s in shape]
    if not shape or any(s <= 0 for s in shape):
        raise InvalidImageError(f"the header declares an invalid size {shape}")
    return math.prod(shape)


#: how far a compressed stream (NRRD data, a deflated DICOM dataset) may expand beyond the size its header
#: declares before it is taken for a decompression bomb (trailing padding some writers add)
DECODE_SLACK = 1 << 20


def bounded_decompress(fh, encoding: str, limit: int, keep: bool = True) -> bytearray:
    """Unpack a gzip, bzip2 or raw deflate (``"deflate"``) stream from ``fh`` in 1 MB steps; more
    than ``limit`` bytes out is a decompression bomb (:class:`ImageTooLargeError`), found after at
    most ``limit`` bytes. ``keep=False`` only counts (nothing is kept)."""
    is_zlib = encoding != "bzip2" and encoding != "bz2"
    if is_zlib:
        d = zlib.decompressobj(-zlib.MAX_WBITS if encoding == "deflate" else zlib.MAX_WBITS | 32)
    else:
        d = bz2.BZ2Decompressor()
    out, size, pending = bytearray(), 0, b""
    while not d.eof:
        if not pending and (is_zlib or d.needs_input):
            pending = fh.read(1 << 20)
            if not pending:
                break
        piece = d.decompress(pending, min(1 << 22, limit + 1 - size))  # never 0 ("no limit" to zlib)
        size += len(piece)
        if keep:
            out += piece
        pending = d.unconsumed_tail if is_zlib else b""
        if size > limit:
            raise ImageTooLargeError(f"the compressed data expands to more than the {limit / 1e6:.0f} MB its header "
                                     "allows (a decompression bomb)")
    return out

