"""Training loss: cross-entropy plus self-supervised constraints on the saliency mask.

``loss = CE + w_rec * reconstruction + w_aff * affinity + w_edge * boundary (+ w_prior * prior)``

Two forms of the three saliency terms are provided; ``configs/train.json`` chooses one
(``loss.form``), and ``"none"`` trains with cross-entropy alone.

**reference** - as the authors' public code computes them (weights 0.5, 1.0, 0.01):

- reconstruction ``L1(x * m, x)``;
- boundary ``L1(sobel(gray), sobel(m))`` in x and y;
- affinity ``MSE`` between the mean-normalised gradient magnitudes of ``gray`` and ``m``.

This form is degenerate. The reconstruction term is minimised (to 0) by ``m = 1`` everywhere,
and the boundary and affinity terms are exactly 0 when ``m`` equals the gray image, so together
they reward a mask that copies the image's texture rather than one that outlines a nodule.

**wellposed** - the same three intents (the mask keeps the informative region, its boundary
follows image edges, similar neighbours get similar saliency) without trivial minimisers:

- *reconstruction* - a two-region (Chan-Vese) fit of the smoothed gray image ``g``:
  ``sum(m (g - mu_in)^2 + (1 - m)(g - mu_out)^2) / sum((g - mean g)^2)``, with ``mu_in``,
  ``mu_out`` the mask-weighted means inside and outside. The image is "reconstructed" by one
  intensity inside the mask and one outside. Any constant mask (all ones, all zeros, 0.5) gives
  exactly 1, the worst possible value (the optimal means can only lower it), and for fixed means
  the term is linear in ``m``, so its minimisers are binary: copying the image is not one.
- *boundary* - edge-aware total variation ``mean(|grad m| * exp(-|grad g| / s))`` with ``s`` the
  image's mean gradient: changing saliency costs little across image edges and a lot in flat
  tissue, so the mask's boundary settles on edges.
- *affinity* - a local pairwise affinity ``sum_ij w_ij (m_i - m_j)^2 / sum_ij w_ij`` over 8
  neighbours (dilated by 1 and 2 px), ``w_ij = exp(-(g_i - g_j)^2 / (2 sigma^2))``: pixels that
  look alike get alike saliency.
- *prior* - the constraints that make the region a lesion and not the background: the mean
  saliency on a border band of the frame (the nodule is inside the box; the frame's border is
  tissue around it) plus a hinge that keeps the salient area between ``area_min`` and
  ``area_max`` of the frame. It breaks the symmetry between a mask and its inverse, and rules
  out the empty and the full mask.

Tests pin the reference values on hand-made tensors, and check on synthetic nodules that the
trivial masks (all ones, all zeros, the image itself, the inverse) score worse than the nodule.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .networks.classifier import ClassifierOutput

__all__ = [
    "REFERENCE_WEIGHTS",
    "WELLPOSED_WEIGHTS",
    "SaliencyGuidedLoss",
    "reference_affinity",
    "reference_boundary",
    "reference_reconstruction",
    "wellposed_affinity",
    "wellposed_boundary",
    "wellposed_prior",
    "wellposed_reconstruction",
]

REFERENCE_WEIGHTS = {"w_rec": 0.5, "w_aff": 1.0, "w_edge": 0.01, "w_prior": 0.0}
WELLPOSED_WEIGHTS = {"w_rec": 1.0, "w_aff": 1.0, "w_edge": 0.5, "w_prior": 1.0}
_EPS = 1e-8


def _gray(image: torch.Tensor) -> torch.Tensor:
    return image.mean(dim=1, keepdim=True)


def _sobel(x: torch.Tensor, padding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sobel responses ``(gx, gy)`` of ``x (B, 1, H, W)``, same size, padded by ``padding``
    (``"zeros"`` or ``"replicate"``)."""
    kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], dtype=x.dtype, device=x.device)
    kx = kx.view(1, 1, 3, 3)
    ky = kx.transpose(2, 3)
    if padding == "zeros":
        return F.conv2d(x, kx, padding=1), F.conv2d(x, ky, padding=1)
    padded = F.pad(x, (1, 1, 1, 1), mode=padding)
    return F.conv2d(padded, kx), F.conv2d(padded, ky)


# ------------------------------------------------------------------------------------- reference
def reference_reconstruction(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``L1(image * mask, image)``; image ``(B, C, H, W)``, mask ``(B, 1, H, W)`` in ``[0, 1]``."""
    return F.l1_loss(image * mask, image)


def reference_boundary(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sobel responses of the gray image and of the mask, compared with L1 (x plus y).

    Zero-padded, as the authors' code convolves (the frame border responds as an edge).
    """
    ix, iy = _sobel(_gray(image), "zeros")
    mx, my = _sobel(mask, "zeros")
    return F.l1_loss(ix, mx) + F.l1_loss(iy, my)


def reference_affinity(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE between the per-image mean-normalised forward-difference magnitudes of gray and mask."""

    def grad_magnitude(x: torch.Tensor) -> torch.Tensor:
        g = torch.zeros_like(x)
        g[:, :, :-1, :] = g[:, :, :-1, :] + (x[:, :, 1:, :] - x[:, :, :-1, :]).abs()
        g[:, :, :, :-1] = g[:, :, :, :-1] + (x[:, :, :, 1:] - x[:, :, :, :-1]).abs()
        return g / (g.mean(dim=(2, 3), keepdim=True) + _EPS)

    return F.mse_loss(grad_magnitude(_gray(image)), grad_magnitude(mask))


# ------------------------------------------------------------------------------------- wellposed
def _smooth(gray: torch.Tensor) -> torch.Tensor:
    # speckle is not structure: a 5x5 box blur before measuring regions and edges
    return F.avg_pool2d(F.pad(gray, (2, 2, 2, 2), mode="replicate"), 5, stride=1)


def wellposed_reconstruction(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Two-region (Chan-Vese) fit of the smoothed gray image, normalised by its variance.

    Returns a value in ``[0, 1]`` per batch (mean over images); 1 for any constant mask.
    """
    g = _smooth(_gray(image)).float()
    m = mask.float()
    dims = (1, 2, 3)
    inside = m.sum(dims, keepdim=True)
    outside = (1 - m).sum(dims, keepdim=True)
    mu_in = (m * g).sum(dims, keepdim=True) / (inside + _EPS)
    mu_out = ((1 - m) * g).sum(dims, keepdim=True) / (outside + _EPS)
    energy = (m * (g - mu_in) ** 2 + (1 - m) * (g - mu_out) ** 2).sum(dims)
    total = ((g - g.mean(dims, keepdim=True)) ** 2).sum(dims)
    return (energy / (total + _EPS)).mean()


def wellposed_boundary(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Edge-aware total variation: ``mean(|grad m| * exp(-|grad g| / mean|grad g|))``.

    The Sobel gradients are edge-replicated, as the smoothing is: the frame's border is not an
    edge of the image (which would make a mask edge along it cheap) nor of the mask.
    """
    g = _smooth(_gray(image)).float()
    m = mask.float()
    gx, gy = _sobel(g, "replicate")
    edge = torch.sqrt(gx**2 + gy**2 + _EPS)
    weight = torch.exp(-edge / (edge.mean(dim=(2, 3), keepdim=True) + _EPS))
    mx, my = _sobel(m, "replicate")
    return (torch.sqrt(mx**2 + my**2 + _EPS) * weight).mean() / 4.0  # Sobel gain is 4 per unit step


def wellposed_affinity(image: torch.Tensor, mask: torch.Tensor, dilations: Sequence[int] = (1, 2)) -> torch.Tensor:
    """Local pairwise affinity: similar-looking neighbours should have similar saliency."""
    g = _smooth(_gray(image)).float()
    m = mask.float()
    num = g.new_zeros(())
    den = g.new_zeros(())
    for d in dilations:
        for dy, dx in ((0, d), (d, 0), (d, d), (d, -d)):
            gi, gj = _shift_pair(g, dy, dx)
            mi, mj = _shift_pair(m, dy, dx)
            sigma2 = ((gi - gj) ** 2).mean(dim=(1, 2, 3), keepdim=True) + _EPS
            w = torch.exp(-((gi - gj) ** 2) / (2 * sigma2))
            num = num + (w * (mi - mj) ** 2).sum()
            den = den + w.sum()
    return num / (den + _EPS)


def _shift_pair(x: torch.Tensor, dy: int, dx: int) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = x.shape[-2:]
    a = x[..., max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
    b = x[..., max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)]
    return a, b


def wellposed_prior(
    mask: torch.Tensor, border: float = 0.08, area_min: float = 0.05, area_max: float = 0.7
) -> torch.Tensor:
    """Border band saliency plus a hinge on the salient area fraction."""
    m = mask.float()
    h, w = m.shape[-2:]
    bh, bw = max(1, int(round(border * h))), max(1, int(round(border * w)))
    band = torch.ones_like(m[:1, :1])
    band[..., bh : h - bh, bw : w - bw] = 0
    border_mean = (m * band).sum(dim=(1, 2, 3)) / band.sum()
    area = m.mean(dim=(1, 2, 3))
    hinge = F.relu(area_min - area) + F.relu(area - area_max)
    return (border_mean + hinge).mean()


_FORMS = ("reference", "wellposed", "none")


class SaliencyGuidedLoss(nn.Module):
    """``CE + w_rec * reconstruction + w_aff * affinity + w_edge * boundary + w_prior * prior``.

    Args:
        form: ``"reference"``, ``"wellposed"`` or ``"none"`` (cross-entropy only).
        weights: ``w_rec``, ``w_aff``, ``w_edge``, ``w_prior``; missing ones take the form's
            defaults (:data:`REFERENCE_WEIGHTS`, :data:`WELLPOSED_WEIGHTS`).
        class_weights: ``None``, a list of per-class CE weights, or ``"balanced"`` (set from the
            training labels by :meth:`set_class_balance`).
        prior: keyword arguments of :func:`wellposed_prior`.

    Call with ``(output: ClassifierOutput, image (B, C, H, W), target (B,))``; returns a dict of
    scalar tensors: ``loss`` (to back-propagate), ``ce``, ``rec``, ``aff``, ``edge``, ``prior``.
    """

    def __init__(
        self,
        form: str = "wellposed",
        weights: Optional[Mapping[str, float]] = None,
        class_weights: Union[None, str, Sequence[float]] = None,
        prior: Optional[Mapping[str, float]] = None,
    ) -> None:
        super().__init__()
        if form not in _FORMS:
            raise ValueError(f"unknown loss form {form!r}; use one of {_FORMS}")
        self.form = form
        defaults = REFERENCE_WEIGHTS if form == "reference" else WELLPOSED_WEIGHTS
        w = dict(defaults)
        unknown = set(weights or {}) - set(w)
        if unknown:
            raise ValueError(f"unknown loss weights {sorted(unknown)}; use {sorted(w)}")
        w.update({k: float(v) for k, v in (weights or {}).items()})
        self.weights = w
        self.balanced = class_weights == "balanced"
        cw = None if class_weights is None or self.balanced else torch.tensor([float(v) for v in class_weights])
        self.register_buffer("class_weights", cw, persistent=False)
        self.prior_args = dict(prior or {})

    def set_class_balance(self, counts: Sequence[int]) -> None:
        """With ``class_weights="balanced"``: weight each class by ``N / (K * n_k)``."""
        if not self.balanced:
            return
        c = torch.tensor([max(1, int(n)) for n in counts], dtype=torch.float32)
        self.class_weights = c.sum() / (len(c) * c)

    def forward(self, output: ClassifierOutput, image: torch.Tensor, target: torch.Tensor) -> dict:
        cw = self.class_weights.to(output.logits.device) if self.class_weights is not None else None
        ce = F.cross_entropy(output.logits.float(), target, weight=cw)
        zero = ce.new_zeros(())
        parts = {"ce": ce, "rec": zero, "aff": zero, "edge": zero, "prior": zero}
        if self.form != "none" and output.saliency_logits is not None:
            mask = torch.sigmoid(output.saliency_logits.float())
            img = image.float()
            if self.form == "reference":
                parts["rec"] = reference_reconstruction(img, mask)
                parts["aff"] = reference_affinity(img, mask)
                parts["edge"] = reference_boundary(img, mask)
            else:
                parts["rec"] = wellposed_reconstruction(img, mask)
                parts["aff"] = wellposed_affinity(img, mask)
                parts["edge"] = wellposed_boundary(img, mask)
                if self.weights["w_prior"]:
                    parts["prior"] = wellposed_prior(mask, **self.prior_args)
        w = self.weights
        parts["loss"] = (
            ce + w["w_rec"] * parts["rec"] + w["w_aff"] * parts["aff"] + w["w_edge"] * parts["edge"] + w["w_prior"] * parts["prior"]
        )
        return parts
