"""Server address history (the widget keeps it in ``qt.QSettings``; the rules are here)."""

from __future__ import annotations

from typing import Iterable, List

from .client import normalize_url
from .errors import ThyroidNoduleError

__all__ = ["DEFAULT_SERVER_URL", "HISTORY_LENGTH", "SETTINGS_HISTORY_KEY", "update_history"]

DEFAULT_SERVER_URL = "http://127.0.0.1:8000"
HISTORY_LENGTH = 8
SETTINGS_HISTORY_KEY = "ThyroidNodule/serverUrlHistory"


def update_history(history: Iterable[str], url: str, length: int = HISTORY_LENGTH) -> List[str]:
    """The address history after ``url`` was used: ``url`` (normalised) first, no duplicates,
    invalid entries dropped, at most ``length`` entries."""
    out = [normalize_url(url)]
    for item in history or []:
        try:
            clean = normalize_url(str(item))
        except ThyroidNoduleError:
            continue
        if clean not in out:
            out.append(clean)
    return out[:length]
