"""Errors the library raises for bad input; callers map them to a CLI exit code or an HTTP 4xx."""


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
