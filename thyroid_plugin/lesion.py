"""Training and evaluation inputs as the product meets them: a frame with a loose box around the
nodule, or the whole frame.

A user draws a box around the nodule loosely, or none. The training recipe therefore cuts
lesion-centred crops from the expert masks with a random margin and jitter, and sometimes keeps
the whole frame; the evaluation measures the classifier at fixed margins (tight, 25 %, 50 %,
whole frame).

Margin convention: a box with margin ``m`` around a lesion of ``w x h`` pixels extends ``m * w``
pixels left and right of the lesion's bounding box and ``m * h`` above and below (clipped to the
frame). ``m = 0`` is the tight bounding box; ``None`` means the whole frame.

Frames are decoded once and kept as their 8-bit pixels (:class:`FrameCache`); each crop is
converted and resized exactly as the served path does (:func:`~thyroid_plugin.io.to_network_channels`,
:func:`~thyroid_plugin.transforms.preprocess_transforms`'s resize), so a network sees the same
numbers in training, evaluation and serving.
"""

from __future__ import annotations

import logging
import math
from typing import Hashable, Mapping, Optional, Sequence

import numpy as np
import torch
from monai.transforms import MapTransform, Randomizable, Resized

from .io import load_image, to_network_channels
from .errors import InvalidROIError
from .transforms import MIN_ROI_SIDE, normalize_roi

logger = logging.getLogger(__name__)

__all__ = ["Box", "FrameCache", "RandLesionCropd", "LesionCropd", "box_from_saliency", "lesion_box", "margin_box", "region_box"]

#: ``(x0, y0, x1, y1)``: columns ``x0:x1``, rows ``y0:y1`` (a NumPy slice, as the REST ``roi``)
Box = tuple[int, int, int, int]


def lesion_box(mask: np.ndarray) -> Optional[Box]:
    """Bounding box of the nonzero pixels of a lesion mask (``(H, W)`` or ``(H, W, C)``), or
    ``None`` for an empty mask."""
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m.max(axis=-1)
    rows = np.flatnonzero(m.any(axis=1))
    cols = np.flatnonzero(m.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def margin_box(box: Box, margin, shape: tuple[int, int], shift: tuple[float, float] = (0.0, 0.0)) -> Box:
    """``box`` grown by ``margin`` (fraction of the lesion's width / height; one number for every
    side, or ``(left, top, right, bottom)``), moved by ``shift`` (fractions of the lesion's width /
    height), clipped to the frame ``(H, W)``; at least ``MIN_ROI_SIDE`` pixels a side where the
    frame allows."""
    x0, y0, x1, y1 = box
    left, top, right, bottom = (margin,) * 4 if np.isscalar(margin) else margin
    bw, bh = x1 - x0, y1 - y0
    dx, dy = shift[0] * bw, shift[1] * bh
    h, w = shape
    return _clip(x0 - left * bw + dx, y0 - top * bh + dy, x1 + right * bw + dx, y1 + bottom * bh + dy, h, w)


def _user_box(roi, shape: tuple[int, int], path: str) -> Optional[Box]:
    """A confirmed ``roi`` as a box on a frame of ``shape``; ``None`` (the whole frame, with a
    warning) for one that does not fit it (the frame was replaced after the confirmation)."""
    try:
        box = normalize_roi(roi, shape)
    except InvalidROIError as e:
        logger.warning("%s: its confirmed roi is not used (%s); the whole frame is", path, e)
        return None
    return None if box is None else _clip(*box, shape[0], shape[1])


def _clip(x0: float, y0: float, x1: float, y1: float, h: int, w: int) -> Box:
    a0, a1 = _fit(x0, x1, w)
    b0, b1 = _fit(y0, y1, h)
    return a0, b0, a1, b1


def _fit(lo: float, hi: float, size: int) -> tuple[int, int]:
    """An integer interval inside ``[0, size)`` covering ``[lo, hi)``, at least the minimum side."""
    a, b = max(0, int(math.floor(lo))), min(size, int(math.ceil(hi)))
    need = min(MIN_ROI_SIDE, size)
    if b - a < need:  # grow around the centre, then push back inside the frame
        c = (a + b) / 2.0
        a = int(round(c - need / 2.0))
        a = min(max(0, a), size - need)
        b = a + need
    return a, b


class FrameCache:
    """Decoded frames (8-bit pixels as stored, gray or RGB) and their lesion boxes, read once.

    ``crop(item, box)`` gives the ``(3, S, S)`` float32 network input of a frame cropped to
    ``box`` (``None``: the whole frame), converted and resized as the served path does.

    With ``user_boxes`` an item's ``roi`` (the nodule box a user confirmed, as MONAI Label's
    datastore keeps it) is the lesion's box, before its mask's.
    """

    def __init__(self, image_size: int, user_boxes: bool = False) -> None:
        self.image_size = int(image_size)
        self.user_boxes = bool(user_boxes)
        self._frames: dict[str, np.ndarray] = {}
        self._boxes: dict[str, tuple[Optional[Box], str]] = {}
        self._resize = Resized("image", spatial_size=(self.image_size, self.image_size), mode="bilinear", anti_aliasing=True)

    def frame(self, item: Mapping) -> np.ndarray:
        path = str(item["image"])
        if path not in self._frames:
            self._frames[path] = np.ascontiguousarray(load_image(path).array)
        return self._frames[path]

    def box(self, item: Mapping) -> Optional[Box]:
        """The lesion's bounding box from ``item["mask"]`` (``None`` without a mask or for an
        empty one). With ``user_boxes``, the item's ``roi`` (clipped to the frame) comes first: the
        box a person drew and confirmed, where a mask sent with a confirmation may be the model's
        own saliency."""
        return self._box_and_source(item)[0]

    def box_source(self, item: Mapping) -> str:
        """Where :meth:`box` takes the item's box from: ``"mask"``, ``"roi"`` or ``"none"``
        (the whole frame)."""
        return self._box_and_source(item)[1]

    def _box_and_source(self, item: Mapping) -> tuple[Optional[Box], str]:
        path = str(item["image"])
        if path not in self._boxes:
            box, source = None, "none"
            if self.user_boxes and item.get("roi"):
                box, source = _user_box(item["roi"], self.frame(item).shape[:2], path), "roi"
            mask = item.get("mask")
            if box is None and mask:
                box, source = lesion_box(load_image(mask).array), "mask"
            self._boxes[path] = (box, source if box is not None else "none")
        return self._boxes[path]

    def crop(self, item: Mapping, box: Optional[Box]) -> torch.Tensor:
        a = self.frame(item)
        if box is not None:
            x0, y0, x1, y1 = box
            a = a[y0:y1, x0:x1]
        x = torch.from_numpy(to_network_channels(a))
        return torch.as_tensor(self._resize({"image": x})["image"]).float()

    def at_margin(self, item: Mapping, margin: Optional[float]) -> torch.Tensor:
        """The input with a box of ``margin`` around the lesion; the whole frame for ``None`` or
        when the item has no lesion mask."""
        box = self.box(item)
        if margin is None or box is None:
            return self.crop(item, None)
        return self.crop(item, margin_box(box, float(margin), self.frame(item).shape[:2]))


class LesionCropd(MapTransform):
    """Deterministic: ``d["image"]`` (a path) becomes the input at a fixed margin (see
    :meth:`FrameCache.at_margin`); for validation and evaluation."""

    def __init__(self, cache: FrameCache, margin: Optional[float], keys: str = "image") -> None:
        super().__init__(keys)
        self.cache = cache
        self.margin = margin

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        d["image"] = self.cache.at_margin(d, self.margin)
        return d


class RandLesionCropd(Randomizable, MapTransform):
    """Random training crop as a user would draw the box: with probability ``whole_frame_prob``
    (or when the item has no lesion mask) the whole frame; otherwise a box around the lesion
    with a margin drawn uniformly from ``[0, max_margin]`` on each side independently and its
    centre moved by up to ``jitter`` of the lesion size."""

    def __init__(self, cache: FrameCache, max_margin: float = 0.6, jitter: float = 0.1,
                 whole_frame_prob: float = 0.2, keys: str = "image") -> None:
        super().__init__(keys)
        self.cache = cache
        self.max_margin = float(max_margin)
        self.jitter = float(jitter)
        self.whole_frame_prob = float(whole_frame_prob)

    def randomize(self, data=None) -> None:
        self._whole = self.R.random_sample() < self.whole_frame_prob
        self._margins = self.R.uniform(0.0, self.max_margin, size=4)
        self._shift = self.R.uniform(-self.jitter, self.jitter, size=2)

    def sample_box(self, item: Mapping) -> Optional[Box]:
        """Draw the box for ``item`` (``None``: whole frame)."""
        self.randomize()
        box = self.cache.box(item)
        if box is None or self._whole:
            return None
        return margin_box(box, tuple(self._margins), self.cache.frame(item).shape[:2], tuple(self._shift))

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        d["image"] = self.cache.crop(d, self.sample_box(d))
        return d


def margin_label(margin: Optional[float]) -> str:
    """``tight``, ``25%``, ``whole frame``..."""
    if margin is None:
        return "whole frame"
    return "tight" if margin == 0 else f"{round(100 * margin)}%"


def margins_from(values: Sequence) -> list[Optional[float]]:
    """Margins from settings (``null``/``"whole"`` for the whole frame)."""
    return [None if v is None or v == "whole" else float(v) for v in values]


def box_from_saliency(saliency: np.ndarray, frame_shape: tuple[int, int], margin: float = 0.25) -> Optional[Box]:
    """The nodule box the saliency map points at, for a frame without a user's box.

    ``saliency`` is the map of the whole frame on the network's grid (``(S, S)``, values in
    ``[0, 1]``). The map is thresholded at its own mean + 1 standard deviation (a rule that does
    not depend on calibration), the connected region holding the most saliency mass is kept, and
    its bounding box, mapped to the frame's pixels, is grown by ``margin`` as a user's loose box
    would be. ``None`` when the map is flat (nothing stands out).
    """
    s = np.asarray(saliency, dtype=np.float64)
    cut = s.mean() + s.std()
    if not np.isfinite(cut) or s.max() <= cut:
        return None
    box = region_box(s, s > cut, frame_shape)
    return None if box is None else margin_box(box, margin, frame_shape)


def region_box(values: np.ndarray, selected: np.ndarray, frame_shape: tuple[int, int]) -> Optional[Box]:
    """The bounding box, in the pixels of a frame of ``frame_shape`` ``(H, W)``, of the connected
    region of ``selected`` (a boolean map on ``values``' grid) that holds the most of ``values``;
    ``None`` when nothing is selected."""
    from scipy import ndimage

    regions, n = ndimage.label(selected)
    if n == 0:
        return None
    mass = ndimage.sum(values, regions, index=np.arange(1, n + 1))
    ys, xs = np.nonzero(regions == int(np.argmax(mass)) + 1)
    h, w = frame_shape
    sy, sx = h / values.shape[0], w / values.shape[1]
    return (int(np.floor(xs.min() * sx)), int(np.floor(ys.min() * sy)),
            min(w, int(np.ceil((xs.max() + 1) * sx))), min(h, int(np.ceil((ys.max() + 1) * sy))))
