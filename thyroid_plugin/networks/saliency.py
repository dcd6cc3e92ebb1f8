"""The light saliency network: a U-shaped encoder-decoder that predicts, without pixel labels, a
1-channel saliency logit map at input resolution and a global saliency embedding."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import DEMLP

__all__ = ["SaliencyNet", "MIN_INPUT_SIZE"]

#: five 2x max-pools: the bottleneck is ``H/32 x W/32`` and must keep at least one pixel.
MIN_INPUT_SIZE = 32


class SaliencyNet(nn.Module):
    """Saliency network of the paper (an UltraLight-VM-UNet-like design).

    Encoder: six stages with channels ``c = [8, 16, 24, 32, 48, 64]``; stages 1-3 are 3x3
    convolutions, stages 4-6 :class:`DEMLP` blocks. Each of the first five stages is followed by
    GroupNorm(4), a 2x max-pool and GELU; the sixth (the bottleneck, ``H/32``) by GELU only. The
    global average of the bottleneck is the saliency embedding. The decoder mirrors the encoder
    (DE-MLP, DE-MLP, DE-MLP, conv, conv), each step GroupNorm -> (bilinear up-sampling) -> GELU
    plus an additive skip from the encoder, and a 1x1 convolution and a last up-sampling give the
    logit map at the input size.

    Args:
        in_channels: image channels (3).
        out_channels: saliency channels (1).
        channels: the six stage widths.

    Shapes: ``(B, in_channels, H, W)`` with ``H, W >= 32`` ->
    ``(logits (B, out_channels, H, W), embedding (B, channels[-1]))``. Any ``H, W`` (not only
    multiples of 32): each decoder step up-samples to the exact size of its skip connection.
    """

    def __init__(
        self, in_channels: int = 3, out_channels: int = 1, channels: Sequence[int] = (8, 16, 24, 32, 48, 64)
    ) -> None:
        super().__init__()
        c = list(channels)
        if len(c) != 6:
            raise ValueError(f"SaliencyNet needs six stage widths, got {c}")
        self.embedding_dim = c[5]
        self.encoders = nn.ModuleList(
            [
                nn.Conv2d(in_channels, c[0], 3, padding=1),
                nn.Conv2d(c[0], c[1], 3, padding=1),
                nn.Conv2d(c[1], c[2], 3, padding=1),
                DEMLP(c[2], c[3]),
                DEMLP(c[3], c[4]),
                DEMLP(c[4], c[5]),
            ]
        )
        self.encoder_norms = nn.ModuleList([nn.GroupNorm(4, c[i]) for i in range(5)])
        self.decoders = nn.ModuleList(
            [
                DEMLP(c[5], c[4]),
                DEMLP(c[4], c[3]),
                DEMLP(c[3], c[2]),
                nn.Conv2d(c[2], c[1], 3, padding=1),
                nn.Conv2d(c[1], c[0], 3, padding=1),
            ]
        )
        self.decoder_norms = nn.ModuleList([nn.GroupNorm(4, c[i]) for i in (4, 3, 2, 1, 0)])
        self.final = nn.Conv2d(c[0], out_channels, kernel_size=1)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[-2] < MIN_INPUT_SIZE or x.shape[-1] < MIN_INPUT_SIZE:
            raise ValueError(f"SaliencyNet needs an input of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}, got {tuple(x.shape[-2:])}")
        skips = []
        out = x
        for encoder, norm in zip(self.encoders[:5], self.encoder_norms):
            out = F.gelu(F.max_pool2d(norm(encoder(out)), 2, 2))
            skips.append(out)  # t1 (H/2) ... t5 (H/32)
        out = F.gelu(self.encoders[5](out))
        embedding = out.mean(dim=(2, 3))

        # decoder step 0 stays at H/32; the others up-sample to their skip's exact size
        out = F.gelu(self.decoder_norms[0](self.decoders[0](out))) + skips[4]
        for i in range(1, 5):
            skip = skips[4 - i]
            up = F.interpolate(
                self.decoder_norms[i](self.decoders[i](out)), size=skip.shape[2:], mode="bilinear", align_corners=True
            )
            out = F.gelu(up) + skip
        logits = F.interpolate(self.final(out), size=x.shape[2:], mode="bilinear", align_corners=True)
        return logits, embedding


def _init_weights(m: nn.Module) -> None:
    # Truncated-normal linears and fan-out normal convolutions, as in the reference saliency net.
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
