"""Names shared by the library, the MONAI Label app and the documentation (one place)."""

#: class index -> name; the network's logit ``i`` is the score of ``CLASS_NAMES[i]``.
CLASS_NAMES = ("benign", "malignant")
#: index of the positive class for ROC-AUC, sensitivity and specificity.
POSITIVE_CLASS = 1
#: the MONAI Label task name.
TASK_NAME = "classify_nodule"
#: the image-info field of a MONAI Label datastore that holds a confirmed diagnosis.
DIAGNOSIS_FIELD = "diagnosis"
#: version of the checkpoint layout written by :mod:`thyroid_plugin.checkpoint`.
CHECKPOINT_FORMAT = "thyroid_plugin.checkpoint/1"


def label_index(label) -> int:
    """Map ``"benign"``/``"malignant"`` (any case), ``0``/``1`` or ``"0"``/``"1"`` to a class index.

    Raises:
        ValueError: for anything else, with the accepted values in the message.
    """
    if isinstance(label, bool):
        raise ValueError(f"invalid label {label!r}; use one of {list(CLASS_NAMES)} or 0/1")
    if isinstance(label, int) and 0 <= label < len(CLASS_NAMES):
        return label
    if isinstance(label, str):
        text = label.strip().lower()
        if text in CLASS_NAMES:
            return CLASS_NAMES.index(text)
        if text in {str(i) for i in range(len(CLASS_NAMES))}:
            return int(text)
    raise ValueError(f"invalid label {label!r}; use one of {list(CLASS_NAMES)} or 0/1")
