"""Standard baselines (MONAI's 2D ResNet-18 and DenseNet-121, trained from scratch) behind the
same interface as :class:`~thyroid_plugin.networks.SaliencyGuidedClassifier`, so the training
engine, the checkpoints and the evaluation treat every variant alike."""

from __future__ import annotations

import torch
from torch import nn

from .classifier import ClassifierOutput

__all__ = ["BaselineClassifier", "BASELINES"]

#: baseline name -> the layer whose output is the last feature map (for Grad-CAM)
BASELINES = {"resnet18": "backbone.layer4", "densenet121": "backbone.features"}


class BaselineClassifier(nn.Module):
    """A MONAI classification network returning :class:`ClassifierOutput` (no saliency map).

    Args:
        name: ``"resnet18"`` or ``"densenet121"``.
        in_channels: image channels (3).
        num_classes: classes (2).

    Shapes: ``(B, in_channels, H, W)`` -> ``ClassifierOutput(logits (B, num_classes), None,
    embedding (B, num_classes), None)``.
    """

    def __init__(self, name: str = "resnet18", in_channels: int = 3, num_classes: int = 2) -> None:
        super().__init__()
        from monai.networks.nets import DenseNet121, resnet18

        if name not in BASELINES:
            raise ValueError(f"unknown baseline {name!r}; use one of {sorted(BASELINES)}")
        self.name = name
        self._config = {"name": name, "in_channels": in_channels, "num_classes": num_classes}
        if name == "resnet18":
            self.backbone = resnet18(spatial_dims=2, n_input_channels=in_channels, num_classes=num_classes)
        else:
            self.backbone = DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=num_classes)
        self.feature_layer = BASELINES[name]

    def network_def(self) -> dict:
        return {"_target_": f"{__package__}.BaselineClassifier", **self._config}

    def forward(self, x: torch.Tensor) -> ClassifierOutput:
        logits = self.backbone(x)
        return ClassifierOutput(logits, None, logits, None)
