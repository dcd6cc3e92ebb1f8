from .classify_nodule import ClassifyNoduleTrainer

__all__ = ["ClassifyNoduleTrainer"]
