from .uncertain import MostUncertain

__all__ = ["MostUncertain"]
