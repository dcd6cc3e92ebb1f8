"""thyroid_plugin: saliency-guided dual-attention classification of thyroid nodules in 2D
ultrasound (the library behind the MONAI Label app and the 3D Slicer module).

Submodules load on first use (``thyroid_plugin.engine`` imports ignite and MONAI), so
``import thyroid_plugin`` stays cheap and bundle configs can name ``thyroid_plugin.engine``.
"""

import importlib

__version__ = "1.0.0"

_SUBMODULES = (
    "checkpoint", "cli", "config", "constants", "data", "engine", "errors", "inference", "io",
    "losses", "metrics", "networks", "reports", "studies", "transforms",
)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
