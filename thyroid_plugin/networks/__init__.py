"""Networks: the saliency network, the dual-attention fusion, the two-branch encoder and the
full classifier (one network per module, MONAI style)."""

from .baselines import BASELINES, BaselineClassifier
from .blocks import ConvBNReLU, DEMLP, DualAttentionFusion
from .classifier import ClassifierOutput, SaliencyGuidedClassifier
from .encoder import TwoBranchEncoder
from .saliency import MIN_INPUT_SIZE, SaliencyNet

__all__ = [
    "BASELINES",
    "BaselineClassifier",
    "ClassifierOutput",
    "ConvBNReLU",
    "DEMLP",
    "DualAttentionFusion",
    "MIN_INPUT_SIZE",
    "SaliencyGuidedClassifier",
    "SaliencyNet",
    "TwoBranchEncoder",
]
