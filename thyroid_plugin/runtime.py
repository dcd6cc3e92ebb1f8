"""Where and in which precision the networks run: shared by training and serving.

Kept apart from :mod:`thyroid_plugin.engine` so that serving (:mod:`thyroid_plugin.inference`,
the MONAI Label app's inference task) does not import the training stack (ignite, MONAI's
datasets).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

__all__ = ["amp_dtype", "autocast", "default_device"]


def default_device() -> torch.device:
    """The first GPU when there is one, else the CPU."""
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def amp_dtype(device: torch.device, amp: str = "auto") -> Optional[torch.dtype]:
    """The autocast dtype for ``device``: bf16 on CPUs with native bf16 and on GPUs that support
    it, fp16 on other GPUs, ``None`` (fp32) otherwise or when ``amp`` is ``"off"``/``"fp32"``."""
    amp = str(amp).lower()
    if amp in ("off", "false", "none", "fp32"):
        return None
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if (amp == "bf16" or torch.cuda.is_bf16_supported()) else torch.float16
    if amp == "bf16":
        return torch.bfloat16
    try:
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    except (AttributeError, RuntimeError):
        return None


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` for ``device`` in ``dtype``, or a no-op context for fp32 (``None``)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
