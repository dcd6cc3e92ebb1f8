"""The full saliency-guided dual-attention classifier of the paper."""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn

from .encoder import TwoBranchEncoder
from .saliency import SaliencyNet

__all__ = ["ClassifierOutput", "SaliencyGuidedClassifier"]


class ClassifierOutput(NamedTuple):
    """Named outputs of :class:`SaliencyGuidedClassifier`.

    - ``logits``: ``(B, num_classes)`` class logits.
    - ``saliency_logits``: ``(B, 1, H, W)`` saliency logits at input resolution (``None`` for the
      variant without a saliency network).
    - ``embedding``: ``(B, feature_dim)`` the feature the classifier head sees.
    - ``saliency_embedding``: ``(B, 64)`` the saliency network's pooled bottleneck (or ``None``).
    """

    logits: torch.Tensor
    saliency_logits: Optional[torch.Tensor]
    embedding: torch.Tensor
    saliency_embedding: Optional[torch.Tensor]


class SaliencyGuidedClassifier(nn.Module):
    """Self-supervised saliency-guided dual-attention fusion classifier.

    1. :class:`SaliencyNet` predicts saliency logits ``s`` and a saliency embedding ``e``.
    2. :class:`TwoBranchEncoder` encodes the image and the enhanced image ``x * sigmoid(s)`` and
       fuses them at every scale.
    3. The head adds ``Linear(e)`` to the pooled last fused map and classifies it with
       ``Linear(C, 128) -> ReLU -> Linear(128, num_classes)``.

    The default arguments give the reference model: 10,262,933 parameters, about 14.2 GFLOPs
    (convolutions and matrix products) for one 224x224 image.

    Args:
        in_channels: image channels (3; gray frames are repeated).
        num_classes: number of classes (2: benign, malignant).
        base_channels: encoder width at the first scale (32).
        num_scales: encoder scales (5).
        patch_size: spatial attention patch size (4).
        saliency_channels: the saliency network's six stage widths.
        head_hidden: hidden width of the classifier head (128).
        variant: ``"full"`` (the paper), or the ablation ``"single_branch"``: the image branch of
            the same encoder and the same head, without the saliency network.

    Shapes: ``(B, in_channels, H, W)`` with ``H, W >= 32`` -> :class:`ClassifierOutput`.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        base_channels: int = 32,
        num_scales: int = 5,
        patch_size: int = 4,
        saliency_channels: Sequence[int] = (8, 16, 24, 32, 48, 64),
        head_hidden: int = 128,
        variant: str = "full",
    ) -> None:
        super().__init__()
        self._config = {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "base_channels": base_channels,
            "num_scales": num_scales,
            "patch_size": patch_size,
            "saliency_channels": list(saliency_channels),
            "head_hidden": head_hidden,
            "variant": variant,
        }
        if variant not in ("full", "single_branch"):
            raise ValueError(f"unknown variant {variant!r}; use 'full' or 'single_branch'")
        self.variant = variant
        self.num_classes = num_classes
        use_saliency = variant == "full"
        self.saliency = SaliencyNet(in_channels, 1, saliency_channels) if use_saliency else None
        self.encoder = TwoBranchEncoder(in_channels, base_channels, num_scales, patch_size, two_branch=use_saliency)
        feature_dim = self.encoder.feature_dim
        self.saliency_projection = nn.Linear(self.saliency.embedding_dim, feature_dim) if use_saliency else None
        self.head = nn.Sequential(
            nn.Linear(feature_dim, head_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(head_hidden, num_classes),
        )

    def network_def(self) -> dict:
        """The config that rebuilds this network (``_target_`` plus the constructor arguments)."""
        return {"_target_": f"{__package__}.SaliencyGuidedClassifier", **self._config}

    def forward(self, x: torch.Tensor) -> ClassifierOutput:
        if self.saliency is None:
            feature, _ = self.encoder(x)
            return ClassifierOutput(self.head(feature), None, feature, None)
        saliency_logits, saliency_embedding = self.saliency(x)
        enhanced = x * torch.sigmoid(saliency_logits)  # broadcast over the image channels
        feature, _ = self.encoder(x, enhanced)
        feature = feature + self.saliency_projection(saliency_embedding)
        return ClassifierOutput(self.head(feature), saliency_logits, feature, saliency_embedding)
