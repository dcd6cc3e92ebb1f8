"""Errors the library raises for bad input; callers map them to a CLI exit code or an HTTP 4xx."""

import re


class ThyroidPluginError(Exception):
    """Base class: the message is one line meant for the user."""


class InvalidImageError(ThyroidPluginError, ValueError):
    """The file is not a readable 2D ultrasound frame (corrupt, unsupported, 3D, too large...)."""


class ImageTooLargeError(InvalidImageError):
    """The frame (or upload) exceeds the configured size limit; refused before decoding."""


class InvalidROIError(ThyroidPluginError, ValueError):
    """The region of interest is malformed or does not overlap the image."""


class ModelNotFoundError(ThyroidPluginError, FileNotFoundError):
    """No model file where one was expected."""


class InvalidModelError(ThyroidPluginError, ValueError):
    """A model file exists but is not a thyroid_plugin checkpoint (or is damaged)."""


class DatalistError(ThyroidPluginError, ValueError):
    """A CSV, folder or datastore could not be turned into a datalist."""


_OBJECT_REPR = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/-])/(?:[^\s/'\"<>:,;()\[\]]+/)+([^\s/'\"<>:,;()\[\]]*)")


def client_text(text: str) -> str:
    """``text`` without what a client of a server must not see: absolute paths become their last
    component, ``<x.Y object at 0x7f...>`` becomes ``Y``."""
    text = _OBJECT_REPR.sub(lambda m: m.group(1).rsplit(".", 1)[-1], str(text))
    return _ABSOLUTE_PATH.sub(lambda m: m.group(1) or "a folder", text)


def short_repr(value, limit: int = 80) -> str:
    """``repr(value)`` cut to one short line (a 400-digit integer, a long list)."""
    try:
        text = repr(value)
    except ValueError:  # an integer too long to print
        text = type(value).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_line(error: BaseException, limit: int = 200, default: str | None = None) -> str:
    """The first line of an exception's message, cut to ``limit`` characters (``default``, else
    the exception's type name, when the message is empty)."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else (default if default is not None else type(error).__name__)
