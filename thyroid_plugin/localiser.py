"""A nodule localiser trained with the expert masks: where to box a whole frame.

The classifier is trained and measured on a box around the nodule (:mod:`thyroid_plugin.lesion`);
on a whole frame without a box it loses 0.13-0.15 ROC-AUC on BUS-BRA, and its own saliency map,
learned without pixel labels, does not find the nodule well enough to box it (``auc_saliency_box``
in ``docs/evaluation.md``). This module is the other answer: a small U-Net
(:class:`monai.networks.nets.BasicUNet`) trained on the whole frames with the lesion masks that
DDTI and BUS-BRA ship (``../shared/data/*/masks``), whose predicted region gives the box
(:func:`box_from_probability`) that the classifier then sees with the usual loose margin.

It is separate from the classifier on purpose: the paper's saliency network stays label-free,
and the localiser can be measured (box IoU against the expert box, and the classifier's ROC-AUC on
its boxes against a 25 % expert box) on its own.

Frames are reduced to one gray channel on a square grid of ``image_size`` pixels (the aspect is
not kept: the box is mapped back to the frame's own pixels).
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .io import load_image
from .io.atomic import atomic_write_bytes
from .lesion import Box, lesion_box, region_box

__all__ = ["FORMAT", "LocaliserFrames", "NoduleLocaliser", "box_from_probability", "box_iou", "build_localiser",
           "train_localiser"]

#: the weights file's ``format``
FORMAT = "thyroid-nodule-localiser/1"
#: U-Net widths (encoder 1-5 and the last decoder): about 0.5 M parameters, ~18 ms per 128-px
#: frame for a training step on 2 CPU cores in bf16
FEATURES = (16, 16, 32, 64, 128, 16)


def build_localiser(features: Sequence[int] = FEATURES) -> torch.nn.Module:
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=tuple(int(f) for f in features))


def gray_grid(frame: np.ndarray, size: int) -> torch.Tensor:
    """``(1, size, size)`` float32 in ``[0, 1]`` of a frame's pixels (gray or RGB, 8-bit or not).

    One float32 copy of the frame's size is made (160 MB for the largest frame the server takes,
    40 megapixels) and scaled in place; nothing in float64."""
    a = np.asarray(frame)
    g = a.mean(axis=-1, dtype=np.float32) if a.ndim == 3 else a.astype(np.float32)
    if a.dtype == np.uint8:
        g /= 255.0
    else:
        lo, hi = float(g.min()), float(g.max())
        g -= lo
        g /= (hi - lo) if hi > lo else 1.0
    x = torch.from_numpy(np.ascontiguousarray(g))[None, None]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def mask_grid(mask: np.ndarray, size: int) -> torch.Tensor:
    """``(1, size, size)`` fraction of lesion pixels in each cell of the grid."""
    m = np.asarray(mask)
    m = m.max(axis=-1) if m.ndim == 3 else m
    x = torch.from_numpy((m > 0).astype(np.float32))[None, None]
    return F.interpolate(x, size=(size, size), mode="area")[0]


class LocaliserFrames:
    """Items with masks, decoded once onto the localiser's grid: ``x`` ``(N, 1, S, S)``, ``y``
    the masks on the same grid, ``boxes`` the expert boxes and ``shapes`` the frames' ``(H, W)``."""

    def __init__(self, items: Sequence[Mapping], size: int) -> None:
        self.items = [d for d in items if d.get("mask")]
        self.size = int(size)
        xs, ys, self.boxes, self.shapes = [], [], [], []
        for d in self.items:
            frame = load_image(d["image"]).array
            mask = load_image(d["mask"]).array
            xs.append(gray_grid(frame, self.size))
            ys.append(mask_grid(mask, self.size))
            self.boxes.append(lesion_box(mask))
            self.shapes.append(tuple(np.asarray(frame).shape[:2]))
        self.x = torch.stack(xs) if xs else torch.zeros(0, 1, self.size, self.size)
        self.y = torch.stack(ys) if ys else torch.zeros(0, 1, self.size, self.size)

    def __len__(self) -> int:
        return len(self.items)


def augment(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random geometry for frames and masks (flip, zoom 0.8-1.2, shift up to 10 %,
    rotation up to 10 degrees) and intensity changes for frames (gain, gamma, speckle, blur), as
    scanners and depth settings differ."""
    n = x.shape[0]

    def u(lo: float, hi: float, shape=(n,)) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=generator)

    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    zoom, angle = u(0.8, 1.2), u(-math.pi / 18, math.pi / 18)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos * flip, -sin, u(-0.1, 0.1)], 1), torch.stack([sin * flip, cos, u(-0.1, 0.1)], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gain, gamma = u(0.7, 1.3, (n, 1, 1, 1)), u(0.7, 1.5, (n, 1, 1, 1))
    x = (x.clamp(0, 1) ** gamma) * gain
    speckle = 1.0 + u(0.0, 0.25, (n, 1, 1, 1)) * torch.randn(x.shape, generator=generator)
    x = x * speckle
    blurred = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    x = torch.where(torch.rand((n, 1, 1, 1), generator=generator) < 0.3, blurred, x)
    return x.clamp(0, 1), y


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice (per frame, then averaged)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum(dim=(1, 2, 3))
    dice = (2 * inter + 1.0) / (p.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1.0)
    return bce + (1.0 - dice).mean()


def box_from_probability(prob: np.ndarray, frame_shape: tuple[int, int], cut: float = 0.5) -> Optional[Box]:
    """The tight box, in the frame's pixels, of the connected region of ``prob > cut`` that holds
    the most probability; ``None`` when nothing passes the cut (no nodule found)."""
    p = np.asarray(prob, dtype=np.float64)
    return region_box(p, p > cut, frame_shape)


def box_iou(a: Optional[Box], b: Optional[Box]) -> float:
    """Intersection over union of two boxes (0 when either is missing)."""
    if a is None or b is None:
        return 0.0
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


class NoduleLocaliser:
    """A trained localiser: ``boxes(frames)`` gives each frame's tight nodule box or ``None``."""

    def __init__(self, network: torch.nn.Module, image_size: int, cut: float = 0.5, record: Optional[dict] = None) -> None:
        self.network = network.eval()
        self.image_size = int(image_size)
        self.cut = float(cut)
        self.record = dict(record or {})

    @classmethod
    def load(cls, path: str | Path) -> "NoduleLocaliser":
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"{path}: not a nodule localiser ({FORMAT})")
        network = build_localiser(payload["features"])
        network.load_state_dict(payload["state_dict"])
        record = {k: v for k, v in payload.items() if k != "state_dict"}
        return cls(network, payload["image_size"], payload.get("cut", 0.5), record)

    @torch.inference_mode()
    def probabilities(self, x: torch.Tensor, batch_size: int = 32) -> np.ndarray:
        """``(N, S, S)`` lesion probability of frames already on the grid (``(N, 1, S, S)``)."""
        out = [torch.sigmoid(self.network(x[i : i + batch_size]).float())[:, 0] for i in range(0, x.shape[0], batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.image_size, self.image_size), np.float32)

    def boxes(self, frames: Sequence[np.ndarray]) -> list[Optional[Box]]:
        """Tight nodule boxes of frames given as pixels (``(H, W)`` or ``(H, W, 3)``)."""
        if not frames:
            return []
        x = torch.stack([gray_grid(f, self.image_size) for f in frames])
        probs = self.probabilities(x)
        return [box_from_probability(p, np.asarray(f).shape[:2], self.cut) for p, f in zip(probs, frames)]


def evaluate_boxes(localiser: NoduleLocaliser, frames: LocaliserFrames) -> dict:
    """Predicted tight boxes of ``frames`` and how they meet the expert boxes: mean IoU, the
    share found at IoU >= 0.5 and the share with no box at all."""
    probs = localiser.probabilities(frames.x)
    boxes = [box_from_probability(p, s, localiser.cut) for p, s in zip(probs, frames.shapes)]
    ious = [box_iou(b, e) for b, e in zip(boxes, frames.boxes)]
    return {"boxes": boxes, "box_iou": float(np.mean(ious)) if ious else float("nan"),
            "found_iou50": float(np.mean([i >= 0.5 for i in ious])) if ious else float("nan"),
            "no_box": float(np.mean([b is None for b in boxes])) if boxes else float("nan"), "ious": ious}


def train_localiser(train: Sequence[Mapping], val: Sequence[Mapping], out_path: str | Path, image_size: int = 128,
                    epochs: int = 30, patience: int = 6, batch_size: int = 16, lr: float = 1e-3, seed: int = 0,
                    progress: Optional[Callable[[str], None]] = None) -> dict:
    """Train a localiser on the whole frames of ``train`` with their masks, keep the epoch with the
    best mean box IoU on ``val``, write it to ``out_path`` (atomically) and return its record.

    Resumable: each epoch's state goes to ``<out_path>.ckpt`` (atomically); a later call with the
    same arguments continues from it. Items without a mask are skipped."""
    out_path = Path(out_path)
    ckpt_path = out_path.with_name(out_path.name + ".ckpt")
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    train_frames, val_frames = LocaliserFrames(train, image_size), LocaliserFrames(val, image_size)
    if len(train_frames) == 0 or len(val_frames) == 0:
        raise ValueError("the localiser needs training and validation frames with lesion masks")
    network = build_localiser()
    optimizer = torch.optim.Adam(network.parameters(), lr=lr)
    state = {"epoch": 0, "best_iou": -1.0, "best_epoch": 0, "best_state": None, "history": []}
    if ckpt_path.is_file():
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        network.load_state_dict(saved["state_dict"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
    generator = torch.Generator().manual_seed(seed + state["epoch"])
    localiser = NoduleLocaliser(network, image_size)
    prep_s = time.perf_counter() - t0
    while state["epoch"] < epochs and state["epoch"] - state["best_epoch"] < patience:
        t_epoch = time.perf_counter()
        network.train()
        order = torch.randperm(len(train_frames), generator=generator)
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            x, y = augment(train_frames.x[idx], train_frames.y[idx], generator)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = network(x)
            loss = segmentation_loss(logits.float(), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        network.eval()
        scored = evaluate_boxes(localiser, val_frames)
        state["epoch"] += 1
        entry = {"epoch": state["epoch"], "loss": total / len(train_frames), "val_box_iou": scored["box_iou"],
                 "val_found_iou50": scored["found_iou50"], "time_s": round(time.perf_counter() - t_epoch, 1)}
        state["history"].append(entry)
        if scored["box_iou"] > state["best_iou"]:
            state.update(best_iou=scored["box_iou"], best_epoch=state["epoch"],
                         best_state={k: v.detach().clone() for k, v in network.state_dict().items()})
        buffer = io.BytesIO()
        torch.save({"state_dict": network.state_dict(), "optimizer": optimizer.state_dict(), "state": state}, buffer)
        atomic_write_bytes(ckpt_path, buffer.getvalue())
        if progress:
            progress(f"[localiser] epoch {state['epoch']}/{epochs} loss {entry['loss']:.4f} val box IoU "
                     f"{entry['val_box_iou']:.3f} found {entry['val_found_iou50']:.2f} ({entry['time_s']:.0f}s)")
    record = {"format": FORMAT, "image_size": int(image_size), "features": list(FEATURES), "cut": 0.5,
              "best_epoch": state["best_epoch"], "val_box_iou": state["best_iou"], "epochs_run": state["epoch"],
              "history": state["history"], "train_frames": len(train_frames), "val_frames": len(val_frames),
              "prepare_s": round(prep_s, 1)}
    buffer = io.BytesIO()
    torch.save({**record, "state_dict": state["best_state"]}, buffer)
    atomic_write_bytes(out_path, buffer.getvalue())
    ckpt_path.unlink(missing_ok=True)
    return record
