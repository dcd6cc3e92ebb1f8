"""Two-branch multi-scale encoder with dual-attention fusion at every scale."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ConvBNReLU, DualAttentionFusion

__all__ = ["TwoBranchEncoder"]


class TwoBranchEncoder(nn.Module):
    """Encode the image and the saliency-enhanced image side by side and fuse them at each scale.

    Scale ``i`` (``i = 0 .. num_scales - 1``) has ``C_i = base_channels * 2**i`` channels; each
    branch runs two :class:`ConvBNReLU` blocks, a :class:`DualAttentionFusion` combines the two
    maps, and the next scale of each branch receives ``avgpool2(fused + branch)``. Pooling keeps
    odd borders (``ceil_mode``), so no row or column is dropped.

    Args:
        in_channels: channels of each input image (3).
        base_channels: ``C_0`` (32).
        num_scales: number of scales (5: 32, 64, 128, 256, 512 channels).
        patch_size: patch size of the spatial attention (4).
        two_branch: ``False`` gives the single-branch ablation: only the image branch, no
            enhanced input and no fusion (the fused map is the image branch itself).

    Shapes: ``image, enhanced: (B, in_channels, H, W)`` -> ``(B, C_last)`` pooled feature and the
    last fused map ``(B, C_last, ceil(H / 2**(S-1)), ceil(W / 2**(S-1)))``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 32,
        num_scales: int = 5,
        patch_size: int = 4,
        two_branch: bool = True,
    ) -> None:
        super().__init__()
        self.two_branch = two_branch
        widths = [base_channels * 2**i for i in range(num_scales)]
        inputs = [in_channels] + widths[:-1]
        self.image_stages = nn.ModuleList(
            [nn.Sequential(ConvBNReLU(i, o), ConvBNReLU(o, o)) for i, o in zip(inputs, widths)]
        )
        if two_branch:
            self.enhanced_stages = nn.ModuleList(
                [nn.Sequential(ConvBNReLU(i, o), ConvBNReLU(o, o)) for i, o in zip(inputs, widths)]
            )
            self.fusions = nn.ModuleList([DualAttentionFusion(w, patch_size) for w in widths])
        self.feature_dim = widths[-1]

    def forward(self, image: torch.Tensor, enhanced: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.two_branch:
            f = image
            for i, stage in enumerate(self.image_stages):
                if i:
                    f = F.avg_pool2d(f, 2, ceil_mode=True)
                f = stage(f)
            return f.mean(dim=(2, 3)), f

        if enhanced is None:
            raise ValueError("the two-branch encoder needs the saliency-enhanced image")
        f_img, f_enh = image, enhanced
        last = len(self.fusions) - 1
        for i, (s_img, s_enh, fusion) in enumerate(zip(self.image_stages, self.enhanced_stages, self.fusions)):
            f_img = s_img(f_img)
            f_enh = s_enh(f_enh)
            fused = fusion(f_img, f_enh)
            if i != last:
                f_img = F.avg_pool2d(fused + f_img, 2, ceil_mode=True)
                f_enh = F.avg_pool2d(fused + f_enh, 2, ceil_mode=True)
        return fused.mean(dim=(2, 3)), fused
