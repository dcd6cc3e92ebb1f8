"""Archive frames: ids that map back to the archive, one frame as a file, a bounded local cache.

Image id of an archive frame: the SOP Instance UID for a single-frame instance, and
``<SOP Instance UID>-f<N>`` for frame ``N`` (DICOM frame number, from 1) of a multi-frame
instance (a cine clip). Both are valid datastore ids (digits, dots, ``-f``; at most 70
characters). The image info adds the study, series and SOP instance UIDs and the frame.

Each instance is fetched once (WADO-RS, as stored: a JPEG-baseline clip stays JPEG) into the
cache; a frame of a multi-frame instance is then cut out of it as a single-frame DICOM file that
keeps every attribute of the instance (patient, study, Sequence of Ultrasound Regions, ...) and
the frame's own pixel data bytes, compressed or not. The cache is bounded
(``archive_cache_mb``): the least recently used files go first. Files are written atomically,
so several server processes (the server, a training or batch run) can share one cache.
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from thyroid_plugin.io import atomic_write_bytes, is_partial_file

logger = logging.getLogger(__name__)

#: SOP classes listed as ultrasound frames: US Image Storage (and its retired form), US
#: Multi-frame Image Storage (and its retired form)
US_SINGLE_FRAME = ("1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.6")
US_MULTI_FRAME = ("1.2.840.10008.5.1.4.1.1.3.1", "1.2.840.10008.5.1.4.1.1.3")
US_CLASSES = US_SINGLE_FRAME + US_MULTI_FRAME

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_CACHE_NAME = re.compile(r"^[0-9][0-9.]{0,63}(-f[1-9][0-9]{0,5})?$")
_FRAME_ID = re.compile(r"^(?P<sop>[0-9.]+)-f(?P<frame>[1-9][0-9]{0,5})$")


@dataclass(frozen=True)
class FrameRef:
    """Where an archive frame lives. ``frame`` is the DICOM frame number (1-based) of a
    multi-frame instance, ``None`` for a single-frame one."""

    study: str
    series: str
    sop: str
    sop_class: str = ""
    frame: Optional[int] = None
    n_frames: int = 1

    @property
    def image_id(self) -> str:
        return self.sop if self.frame is None else f"{self.sop}-f{self.frame}"

    def info(self) -> dict:
        return {"study_instance_uid": self.study, "series_instance_uid": self.series, "sop_instance_uid": self.sop,
                "sop_class_uid": self.sop_class, "frame": self.frame or 1, "frames": self.n_frames}


def is_uid(value) -> bool:
    """A DICOM UID: digits and dots, at most 64 characters."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID.match(value))


def parse_image_id(image_id: str) -> tuple[str, Optional[int]]:
    """``(SOP instance UID, frame or None)`` of an archive image id.

    Raises:
        ValueError: not an archive image id.
    """
    m = _FRAME_ID.match(image_id or "")
    if m:
        return m.group("sop"), int(m.group("frame"))
    if is_uid(image_id):
        return image_id, None
    raise ValueError(f"{image_id!r} is not an archive image id (a SOP instance UID, or UID-fN for frame N of a clip)")


def refs_of_instance(row: dict) -> list[FrameRef]:
    """The frames of one QIDO-RS instance row (DICOM JSON) of an ultrasound instance."""

    def value(tag: str, default=None):
        v = row.get(tag, {}).get("Value")
        return v[0] if v else default

    study, series, sop = value("0020000D"), value("0020000E"), value("00080018")
    sop_class = value("00080016", "")
    if not all(is_uid(u) for u in (study, series, sop)) or sop_class not in US_CLASSES:
        return []  # (a UID names cache files and URL paths: nothing else is taken from the archive)
    try:
        n = max(1, int(value("00280008", 1) or 1))
    except (TypeError, ValueError):
        n = 1
    if sop_class in US_SINGLE_FRAME and n == 1:
        return [FrameRef(study, series, sop, sop_class)]
    return [FrameRef(study, series, sop, sop_class, frame=i, n_frames=n) for i in range(1, n + 1)]


def single_frame_file(instance: bytes, frame: int) -> bytes:
    """Frame ``frame`` (1-based) of a multi-frame DICOM instance, as a single-frame DICOM file
    with every other attribute kept and the frame's pixel data bytes as they were stored."""
    import pydicom
    from pydicom.encaps import encapsulate, generate_pixel_data_frame

    ds = pydicom.dcmread(io.BytesIO(instance), force=True)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    if not 1 <= frame <= n:
        raise ValueError(f"frame {frame} asked for, the instance has {n}")
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        for index, data in enumerate(generate_pixel_data_frame(ds.PixelData, n), start=1):
            if index == frame:
                ds.PixelData = encapsulate([data])
                ds["PixelData"].VR = "OB"
                break
    else:
        size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * (int(ds.BitsAllocated) // 8)
        ds.PixelData = ds.PixelData[(frame - 1) * size: frame * size]
    ds.NumberOfFrames = 1
    for name in ("FrameIncrementPointer", "FrameTimeVector", "FrameTime"):
        if name in ds:
            delattr(ds, name)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, write_like_original=False)
    return buf.getvalue()


class FrameCache:
    """Instance and frame files on local disk, at most ``max_bytes`` in all (LRU by mtime).

    Args:
        root: the cache folder (created when needed).
        max_bytes: size bound; the least recently used files are removed past it.
    """

    def __init__(self, root: os.PathLike | str, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._fetching: dict[str, threading.Lock] = {}

    def path(self, kind: str, name: str) -> Path:
        if kind not in ("instances", "frames", "reports") or not _CACHE_NAME.match(name):
            raise ValueError(f"not a cache file name: {kind}/{name!r}"[:200])
        return self.root / kind / f"{name}.dcm"

    def image_id_of(self, path) -> Optional[str]:
        """The image id whose frame file (``get_image_uri``) ``path`` is: ``instances/<UID>.dcm``
        or ``frames/<UID>-f<N>.dcm`` of this cache; ``None`` for any other file."""
        if not isinstance(path, (str, os.PathLike)):
            return None
        folder, name = os.path.split(os.path.realpath(path))
        stem, ext = os.path.splitext(name)
        kind = os.path.basename(folder)
        if ext != ".dcm" or kind not in ("instances", "frames") or not _CACHE_NAME.match(stem):
            return None
        if os.path.dirname(folder) != os.path.realpath(self.root):
            return None
        return stem

    def get(self, kind: str, name: str, make: Callable[[], bytes]) -> Path:
        """The cached file ``kind/name.dcm``, made by ``make()`` if it is not there (one thread
        makes a given file at a time; the others wait and use it)."""
        path = self.path(kind, name)
        if self._touch(path):
            return path
        with self._lock:
            lock = self._fetching.setdefault(f"{kind}/{name}", threading.Lock())
        try:
            with lock:
                if self._touch(path):
                    return path
                data = make()
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(path, data)
        finally:
            with self._lock:
                self._fetching.pop(f"{kind}/{name}", None)
        self.evict(keep=path)
        return path

    @staticmethod
    def _touch(path: Path) -> bool:
        try:
            os.utime(path)  # most recently used
            return True
        except FileNotFoundError:
            return False

    def files(self) -> list[tuple[float, int, Path]]:
        out = []
        for folder in (self.root / "instances", self.root / "frames", self.root / "reports"):
            if not folder.is_dir():
                continue
            for entry in os.scandir(folder):
                if entry.is_file(follow_symlinks=False) and not is_partial_file(entry.name):
                    st = entry.stat()
                    out.append((st.st_mtime, st.st_size, Path(entry.path)))
        return out

    def size(self) -> int:
        return sum(size for _, size, _ in self.files())

    def evict(self, keep: Optional[Path] = None) -> int:
        """Remove the least recently used files until the cache fits; returns how many went."""
        files = sorted(self.files(), key=lambda f: f[0])
        total = sum(size for _, size, _ in files)
        removed = 0
        for _, size, path in files:
            if total <= self.max_bytes:
                break
            if keep is not None and path == keep:
                continue
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            total -= size
            removed += 1
        return removed
