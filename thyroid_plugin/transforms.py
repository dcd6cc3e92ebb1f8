"""MONAI dictionary transforms for 2D ultrasound: load, crop to a nodule box, network input,
resize and ultrasound-suitable augmentation.

A data item is a dict; ``"image"`` holds the path before :class:`LoadUltrasoundd` and a
``(3, H, W)`` float32 tensor in ``[0, 1]`` after it. Geometry that inference needs to map the
saliency back (the original frame size and the crop box) travels in ``"image_meta_dict"``.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Optional, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    Resized,
)

from .errors import InvalidROIError, short_repr
from .io import DEFAULT_MAX_PIXELS, UltrasoundImage, load_image

__all__ = [
    "CropROId",
    "LoadUltrasoundd",
    "augmentation_transforms",
    "normalize_roi",
    "preprocess_transforms",
    "train_transforms",
    "eval_transforms",
]

#: smallest accepted box side in pixels
MIN_ROI_SIDE = 8


def normalize_roi(roi, shape: tuple[int, int]) -> Optional[tuple[int, int, int, int]]:
    """Validate a nodule box and clip it to the frame.

    Args:
        roi: ``None``, or ``[x0, y0, x1, y1]`` in pixel indices of the frame: ``x`` is the column
            and ``y`` the row, ``x0, y0`` inclusive and ``x1, y1`` exclusive (a NumPy slice).
            Corners in either order are accepted; non-integers are rounded outward.
        shape: the frame's ``(H, W)``.

    Returns:
        ``(x0, y0, x1, y1)`` clipped to the frame, or ``None`` for no box.

    Raises:
        InvalidROIError: malformed, outside the frame, or smaller than 8x8 pixels after clipping.
    """
    if roi is None or (isinstance(roi, (list, tuple)) and len(roi) == 0):
        return None
    if isinstance(roi, str) or not hasattr(roi, "__len__") or len(roi) != 4:
        raise InvalidROIError(f"roi must be [x0, y0, x1, y1] (4 numbers), got {short_repr(roi)}")
    try:
        values = [float(v) for v in roi]
    except (TypeError, ValueError):
        raise InvalidROIError(f"roi must hold 4 numbers, got {short_repr(roi)}") from None
    except OverflowError:  # an integer beyond any float
        values = [np.inf]
    if not all(np.isfinite(values)):
        raise InvalidROIError(f"roi values must be finite numbers, got {short_repr(roi)}")
    x0, x1 = sorted(values[0::2])
    y0, y1 = sorted(values[1::2])
    h, w = shape
    cx0, cy0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
    cx1, cy1 = min(w, int(np.ceil(x1))), min(h, int(np.ceil(y1)))
    if cx1 - cx0 < MIN_ROI_SIDE or cy1 - cy0 < MIN_ROI_SIDE:
        raise InvalidROIError(
            f"roi {[x0, y0, x1, y1]} covers {max(0, cx1 - cx0)}x{max(0, cy1 - cy0)} pixels of the "
            f"{w}x{h} frame; at least {MIN_ROI_SIDE}x{MIN_ROI_SIDE} inside the frame is needed"
        )
    return cx0, cy0, cx1, cy1


class LoadUltrasoundd(MapTransform):
    """Load a 2D frame (any format :func:`thyroid_plugin.io.load_image` reads) as ``(3, H, W)``
    float32 in ``[0, 1]``, gray repeated to three channels.

    Adds ``{key}_meta_dict`` with ``filename``, ``spatial_shape`` ``(H, W)`` and ``format``; with
    ``keep_image=True`` also ``{key}_source``, the :class:`~thyroid_plugin.io.UltrasoundImage`
    (geometry and header, for writing results back).
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        frame: Optional[int] = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        keep_image: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.frame = frame
        self.max_pixels = max_pixels
        self.keep_image = keep_image

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            source = d[key]
            image = source if isinstance(source, UltrasoundImage) else load_image(source, self.frame, self.max_pixels)
            d[key] = torch.from_numpy(image.to_float())
            d[f"{key}_meta_dict"] = {
                "filename": image.path or "",
                "spatial_shape": np.asarray(image.shape),
                "format": image.format,
            }
            if self.keep_image:
                d[f"{key}_source"] = image
        return d


class CropROId(MapTransform):
    """Crop ``(C, H, W)`` images to the nodule box in ``d[roi_key]`` (see :func:`normalize_roi`).

    Items without a box pass unchanged. The box actually used (clipped) is stored as
    ``{key}_meta_dict["roi"]`` (``[0, 0, W, H]`` when there was none), which inference uses to
    paste the saliency back into the full frame.

    With ``max_side``, a crop longer than that on a side is then shrunk by the smallest integer
    factor that brings it within, averaging blocks of pixels: the anti-aliased resize that
    follows would otherwise smooth the whole large frame (a 6000 x 6000 frame took 23 s and
    gigabytes of memory); its result on the shrunk crop is nearly the same.
    """

    def __init__(self, keys: KeysCollection = "image", roi_key: str = "roi", max_side: Optional[int] = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.roi_key = roi_key
        self.max_side = max_side

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            h, w = int(img.shape[-2]), int(img.shape[-1])
            box = normalize_roi(d.get(self.roi_key), (h, w))
            meta = d.setdefault(f"{key}_meta_dict", {})
            if box is None:
                meta["roi"] = np.asarray([0, 0, w, h])
            else:
                x0, y0, x1, y1 = box
                img = img[..., y0:y1, x0:x1]
                meta["roi"] = np.asarray(box)
            d[key] = self._shrink(img)
        return d

    def _shrink(self, img):
        side = max(int(img.shape[-2]), int(img.shape[-1]))
        if self.max_side is None or side <= self.max_side:
            return img
        factor = -(-side // int(self.max_side))
        x = torch.as_tensor(img, dtype=torch.float32)
        return torch.nn.functional.avg_pool2d(x[None], kernel_size=factor, stride=factor, ceil_mode=True)[0]


#: crops longer than this on a side are shrunk by block averaging before the final resize
#: (:class:`CropROId`); ultrasound frames are smaller, so only oversized uploads are affected
SHRINK_ABOVE = 2048


def preprocess_transforms(image_size: int, keys: Sequence[str] = ("image",)) -> list:
    """Deterministic part: load, crop to the box (large crops shrunk), resize to ``image_size x image_size``."""
    return [
        LoadUltrasoundd(keys),
        CropROId(keys, max_side=max(SHRINK_ABOVE, 4 * int(image_size))),
        Resized(keys, spatial_size=(image_size, image_size), mode="bilinear", anti_aliasing=True),
    ]


def augmentation_transforms(
    image_size: int, settings: Optional[Mapping] = None, keys: Sequence[str] = ("image",)
) -> list:
    """Random augmentation suitable for B-mode ultrasound frames of ``image_size`` pixels.

    Left-right flips (transverse and longitudinal views have no handedness that matters for the
    diagnosis), small rotations, scalings and shifts (probe position), gamma and gain changes
    (machine settings), mild Gaussian noise and blur (speckle and focus). No up-down flip: the
    skin line is at the top of every frame and echo shadows run downwards.

    Args:
        image_size: side of the (square) network input, to express shifts in pixels.
        settings: overrides for ``rotate_deg``, ``scale``, ``translate`` (fraction of the side),
            ``gamma``, ``gain``, ``noise_std``, ``prob`` (the configs' ``augmentation`` section).
    """
    s = {"rotate_deg": 10.0, "scale": 0.1, "translate": 0.05, "gamma": (0.7, 1.5), "gain": 0.1, "noise_std": 0.02, "prob": 0.5}
    s.update(dict(settings or {}))
    p = float(s["prob"])
    shift = float(s["translate"]) * image_size
    return [
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandAffined(
            keys,
            prob=p,
            rotate_range=(float(np.deg2rad(s["rotate_deg"])),),
            scale_range=(float(s["scale"]), float(s["scale"])),
            translate_range=(shift, shift),
            mode="bilinear",
            padding_mode="zeros",
        ),
        RandAdjustContrastd(keys, prob=p, gamma=tuple(s["gamma"])),
        RandScaleIntensityd(keys, factors=float(s["gain"]), prob=p),
        RandGaussianNoised(keys, prob=p / 2, std=float(s["noise_std"])),
        RandGaussianSmoothd(keys, prob=p / 2, sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0)),
        _Clamp01d(keys),
    ]


class _Clamp01d(MapTransform):
    """Keep intensities in ``[0, 1]`` after gain and noise (the network's input range)."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = torch.as_tensor(d[key]).clamp_(0.0, 1.0)
        return d


def train_transforms(image_size: int, augmentation: Optional[Mapping] = None) -> Compose:
    """Training pipeline: :func:`preprocess_transforms` then :func:`augmentation_transforms`."""
    return Compose(preprocess_transforms(image_size) + augmentation_transforms(image_size, augmentation))


def eval_transforms(image_size: int) -> Compose:
    """Validation / inference pipeline (no randomness)."""
    return Compose(preprocess_transforms(image_size))
