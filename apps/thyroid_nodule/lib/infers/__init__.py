from .classify_nodule import ClassifyNodule

__all__ = ["ClassifyNodule"]
