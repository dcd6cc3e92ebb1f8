"""Ultrasound augmentation for scanner and centre shift, applied to ``(3, S, S)`` network inputs in
``[0, 1]`` (after the crop and resize).

Beyond the geometric and intensity augmentation of
:func:`~thyroid_plugin.transforms.augmentation_transforms`, clinical frames differ by:

- **speckle** grain and strength (probe frequency, compounding, speckle reduction filters):
  multiplicative noise of random strength with a grain of one to three pixels;
- **resolution**: a lower-resolution probe or a zoomed-out depth: down- then up-sampling;
- **depth scale**: the same tissue drawn taller or shorter (a different depth setting):
  a vertical stretch;
- **gain curves**: the time-gain compensation makes brightness vary with depth: a smooth random
  gain profile over the rows;
- **on-screen marks**: caliper crosses, dotted measurement lines, measurement text and colour
  doppler boxes, which clinical frames carry and which no training frame of a curated set does.

Each transform draws from its own random state (MONAI :class:`~monai.transforms.Randomizable`),
so a seeded pipeline is reproducible.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import MapTransform, Randomizable

__all__ = ["RandUltrasoundShiftd", "RandScreenMarksd", "ultrasound_shift_transforms"]


class RandUltrasoundShiftd(Randomizable, MapTransform):
    """Speckle, resolution loss, depth scale and depth-dependent gain, each with probability
    ``prob``."""

    def __init__(self, keys: str = "image", prob: float = 0.3, speckle: tuple[float, float] = (0.05, 0.25),
                 downsample: tuple[float, float] = (1.3, 3.0), depth_scale: float = 0.15, gain: float = 0.25) -> None:
        super().__init__(keys)
        self.prob = float(prob)
        self.speckle = speckle
        self.downsample = downsample
        self.depth_scale = float(depth_scale)
        self.gain = float(gain)

    def randomize(self, data=None) -> None:
        self._do = self.R.random_sample(4) < self.prob
        self._speckle = self.R.uniform(*self.speckle)
        self._grain = self.R.randint(1, 4)
        self._factor = self.R.uniform(*self.downsample)
        self._stretch = 1.0 + self.R.uniform(-self.depth_scale, self.depth_scale)
        self._gain_terms = self.R.uniform(-self.gain, self.gain, size=3)
        self._noise_seed = int(self.R.randint(0, 2**31 - 1))

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.randomize()
        x = torch.as_tensor(d[self.keys[0]]).float()
        if self._do[0]:
            x = self._apply_speckle(x)
        if self._do[1]:
            x = self._apply_resolution(x)
        if self._do[2]:
            x = self._apply_depth_scale(x)
        if self._do[3]:
            x = self._apply_gain(x)
        d[self.keys[0]] = x.clamp_(0.0, 1.0)
        return d

    def _apply_speckle(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(self._noise_seed)
        h, w = x.shape[-2:]
        n = torch.randn((1, 1, h, w), generator=g)
        if self._grain > 1:  # correlated grain: box-smooth, then restore unit variance
            k = self._grain
            n = F.avg_pool2d(n, k, stride=1, padding=k // 2, count_include_pad=False)[..., :h, :w] * k
        return x * (1.0 + self._speckle * n[0])

    def _apply_resolution(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        small = (max(4, int(round(h / self._factor))), max(4, int(round(w / self._factor))))
        y = F.interpolate(x[None], size=small, mode="area")
        return F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)[0]

    def _apply_depth_scale(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        nh = max(4, int(round(h * self._stretch)))
        y = F.interpolate(x[None], size=(nh, w), mode="bilinear", align_corners=False)[0]
        if nh >= h:  # taller: keep the top (the skin line stays at the top)
            return y[:, :h]
        return torch.cat([y, torch.zeros((x.shape[0], h - nh, w), dtype=x.dtype)], dim=1)  # shorter: no echo below

    def _apply_gain(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-2]
        depth = torch.linspace(0.0, 1.0, h)
        profile = sum(float(a) * torch.cos((k + 1) * np.pi * depth) for k, a in enumerate(self._gain_terms))
        return x * torch.exp(profile)[None, :, None]


class RandScreenMarksd(Randomizable, MapTransform):
    """Synthetic on-screen marks with probability ``prob``: one to four caliper crosses (``+`` or
    ``x``), with probability 1/2 a dotted line between two of them, with probability 1/2 a line of
    measurement text, with probability 1/4 a colour doppler box (a coloured outline with red and
    blue flow blobs inside)."""

    def __init__(self, keys: str = "image", prob: float = 0.3) -> None:
        super().__init__(keys)
        self.prob = float(prob)

    def randomize(self, data=None) -> None:
        self._do = self.R.random_sample() < self.prob

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.randomize()
        if not self._do:
            return d
        x = torch.as_tensor(d[self.keys[0]]).float().clone()
        img = x.permute(1, 2, 0).numpy()  # a view: drawing writes into x
        h, w = img.shape[:2]
        crosses = [self._cross(img) for _ in range(self.R.randint(1, 5))]
        if len(crosses) >= 2 and self.R.random_sample() < 0.5:
            self._dotted_line(img, crosses[0], crosses[1])
        if self.R.random_sample() < 0.5:
            self._text(img)
        if self.R.random_sample() < 0.25:
            self._doppler_box(img)
        d[self.keys[0]] = x.clamp_(0.0, 1.0)
        return d

    def _colour(self, gray: bool = True) -> np.ndarray:
        v = self.R.uniform(0.75, 1.0)
        if gray or self.R.random_sample() < 0.6:
            return np.array([v, v, v], dtype=np.float32)
        return np.array([v, v, self.R.uniform(0.0, 0.4)], dtype=np.float32)  # yellow marks, as some scanners draw

    def _cross(self, img: np.ndarray) -> tuple[int, int]:
        h, w = img.shape[:2]
        r = int(self.R.randint(2, max(3, min(h, w) // 24) + 1))
        cy, cx = int(self.R.randint(r, h - r)), int(self.R.randint(r, w - r))
        c = self._colour(gray=False)
        offsets = np.arange(-r, r + 1)
        if self.R.random_sample() < 0.5:  # +
            img[cy, cx + offsets] = c
            img[cy + offsets, cx] = c
        else:  # x
            img[cy + offsets, cx + offsets] = c
            img[cy + offsets, cx - offsets] = c
        return cy, cx

    def _dotted_line(self, img: np.ndarray, a: tuple[int, int], b: tuple[int, int]) -> None:
        n = max(abs(a[0] - b[0]), abs(a[1] - b[1]))
        if n < 4:
            return
        t = np.linspace(0.0, 1.0, n + 1)[::3]
        ys = np.round(a[0] + t * (b[0] - a[0])).astype(int)
        xs = np.round(a[1] + t * (b[1] - a[1])).astype(int)
        img[ys, xs] = self._colour()

    def _text(self, img: np.ndarray) -> None:
        from PIL import Image, ImageDraw, ImageFont

        h, w = img.shape[:2]
        chars = "0123456789.cmDL: "
        text = "".join(chars[i] for i in self.R.randint(0, len(chars), size=self.R.randint(4, 12)))
        canvas = Image.new("L", (w, h), 0)
        ImageDraw.Draw(canvas).text((int(self.R.randint(0, max(1, w // 2))), int(self.R.randint(0, max(1, h - 12)))),
                                    text, fill=255, font=ImageFont.load_default())
        ink = np.asarray(canvas, dtype=np.float32)[..., None] / 255.0
        img[:] = img * (1.0 - ink) + ink * self._colour()

    def _doppler_box(self, img: np.ndarray) -> None:
        h, w = img.shape[:2]
        bh, bw = int(self.R.randint(h // 4, h // 2 + 1)), int(self.R.randint(w // 4, w // 2 + 1))
        y0, x0 = int(self.R.randint(0, h - bh)), int(self.R.randint(0, w - bw))
        outline = np.array([0.2, 0.9, 0.3], dtype=np.float32) if self.R.random_sample() < 0.5 else self._colour()
        img[y0, x0 : x0 + bw] = outline
        img[y0 + bh - 1, x0 : x0 + bw] = outline
        img[y0 : y0 + bh, x0] = outline
        img[y0 : y0 + bh, x0 + bw - 1] = outline
        yy, xx = np.mgrid[0:h, 0:w]
        for _ in range(self.R.randint(1, 4)):
            cy, cx = self.R.uniform(y0, y0 + bh), self.R.uniform(x0, x0 + bw)
            r = self.R.uniform(2.0, max(3.0, min(bh, bw) / 5.0))
            blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
            colour = np.array([0.9, 0.1, 0.1] if self.R.random_sample() < 0.5 else [0.1, 0.2, 0.9], dtype=np.float32)
            img[blob] = colour


def ultrasound_shift_transforms(settings: Optional[Mapping] = None, keys: Sequence[str] = ("image",)) -> list:
    """The transforms of this module with ``settings`` (``shift_prob``, ``marks_prob``; 0 turns
    a group off)."""
    s = {"shift_prob": 0.3, "marks_prob": 0.3}
    s.update(dict(settings or {}))
    out = []
    if s["shift_prob"] > 0:
        out.append(RandUltrasoundShiftd(keys[0], prob=float(s["shift_prob"])))
    if s["marks_prob"] > 0:
        out.append(RandScreenMarksd(keys[0], prob=float(s["marks_prob"])))
    return out
