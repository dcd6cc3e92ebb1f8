"""Building blocks of the saliency-guided dual-attention classifier.

All blocks take and return ``(B, C, H, W)`` tensors and work for any spatial size; they are
written so that a ``torch.channels_last`` input stays channels-last (no hidden copies).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvBNReLU", "DEMLP", "DualAttentionFusion"]


class ConvBNReLU(nn.Sequential):
    """3x3 convolution (no bias) -> BatchNorm -> ReLU, spatial size preserved.

    Args:
        in_channels: input channels ``C_in``.
        out_channels: output channels ``C_out``.

    Shapes: ``(B, C_in, H, W) -> (B, C_out, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class DEMLP(nn.Module):
    """The "DE-MLP" token-mixing block of the saliency network (depthwise-enhanced MLP).

    ``LayerNorm -> Linear(C, C/2) -> depthwise 3x3 -> GELU -> Linear(C/2, C) -> depthwise 3x3
    -> GELU``, plus a learned-scale skip of the normed input, then the same LayerNorm again and a
    Linear projection to ``out_channels``.

    Args:
        in_channels: input channels ``C`` (must be even).
        out_channels: output channels ``C_out``.

    Shapes: ``(B, C, H, W) -> (B, C_out, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        if in_channels % 2:
            raise ValueError(f"DEMLP needs an even number of input channels, got {in_channels}")
        hidden = in_channels // 2
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm = nn.LayerNorm(in_channels)
        self.fc1 = nn.Linear(in_channels, hidden)
        self.dwconv1 = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=True)
        self.fc2 = nn.Linear(hidden, in_channels)
        self.dwconv2 = nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=True)
        self.act = nn.GELU()
        self.proj = nn.Linear(in_channels, out_channels)
        self.skip_scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"DEMLP expected {self.in_channels} channels, got {x.shape[1]}")
        # Linear layers act on the channel (last) dimension of a (B, H, W, C) view; for a
        # channels-last input that view is contiguous, so no copy is made.
        tokens = self.norm(x.permute(0, 2, 3, 1))
        h = self.fc1(tokens).permute(0, 3, 1, 2)
        h = self.act(self.dwconv1(h)).permute(0, 2, 3, 1)
        h = self.fc2(h).permute(0, 3, 1, 2)
        h = self.act(self.dwconv2(h)).permute(0, 2, 3, 1)
        h = self.norm(h + self.skip_scale * tokens)
        return self.proj(h).permute(0, 3, 1, 2)


class DualAttentionFusion(nn.Module):
    """Fuse the image branch and the saliency-enhanced branch at one scale.

    The two maps are concatenated and re-weighted by the sum of

    - a variance-guided channel attention, ``x * sigmoid(var_{H,W}(x))`` (channels whose response
      varies over the image carry structure, flat channels are damped), and
    - a patch-wise spatial attention, ``x * upsample(sigmoid(avgpool_p(x)))`` over ``p x p``
      patches,

    then projected back to ``C`` channels by a 1x1 convolution.

    Unlike the reference implementation, a map whose size is not a multiple of the patch size
    keeps its border: the last, partial patch is averaged over the pixels it has (``ceil_mode``).

    Args:
        channels: channels ``C`` of each branch.
        patch_size: spatial attention patch size ``p`` (4 in the paper).

    Shapes: two ``(B, C, H, W)`` maps ``-> (B, C, H, W)``; ``H * W`` must be at least 2.
    """

    def __init__(self, channels: int, patch_size: int = 4) -> None:
        super().__init__()
        self.channels = channels
        self.patch_size = patch_size
        self.project = nn.Conv2d(2 * channels, channels, kernel_size=1, bias=False)

    @staticmethod
    def channel_attention(x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x.var(dim=(2, 3), keepdim=True))

    def spatial_attention(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(x, self.patch_size, self.patch_size, ceil_mode=True)
        attn = F.interpolate(torch.sigmoid(pooled), size=x.shape[2:], mode="bilinear", align_corners=False)
        return x * attn

    def forward(self, x_image: torch.Tensor, x_enhanced: torch.Tensor) -> torch.Tensor:
        x = torch.cat((x_image, x_enhanced), dim=1)
        return self.project(self.channel_attention(x) + self.spatial_attention(x))
