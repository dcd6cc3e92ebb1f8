"""Datalists and splits.

A datalist is a list of dicts, one per image::

    {"image": "/abs/path.png", "label": 0 | 1, "group": "case id", "centre": "device or site",
     "mask": "/abs/mask.png" (optional, evaluation only), "roi": [x0, y0, x1, y1] (optional)}

``group`` is the unit that must never be split (a case or patient with several frames);
``centre`` is the acquisition site or device for cross-centre protocols.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence


from .constants import CLASS_NAMES, DIAGNOSIS_FIELD, label_index
from .errors import DatalistError
from .io import IMAGE_SUFFIXES, atomic_write_bytes
from .io import image_id as image_id_of

__all__ = [
    "IMAGE_SUFFIXES",
    "FixedGroupSplit",
    "class_counts",
    "cross_centre_split",
    "datalist_from_csv",
    "datalist_from_datastore",
    "datalist_from_folder",
    "grouped_kfold",
    "grouped_split",
    "load_datalist",
    "write_datalist_csv",
]

_FILE_COLUMNS = ("file", "image", "path", "filename")
_GROUP_COLUMNS = ("case", "group", "patient", "patient_id", "subject")
_CENTRE_COLUMNS = ("centre", "center", "device", "site", "scanner")


def _pick(columns: Iterable[str], candidates: Sequence[str]) -> Optional[str]:
    lower = {c.strip().lower(): c for c in columns}
    for name in candidates:
        if name in lower:
            return lower[name]
    return None


def datalist_from_csv(path: os.PathLike | str, require_exists: bool = True) -> list[dict]:
    """Read a CSV with a file column (``file``/``image``/``path``), ``label`` (``benign``,
    ``malignant``, 0 or 1) and optional group (``case``/``group``/``patient``), centre
    (``centre``/``center``/``device``/``site``) and ``mask`` columns. Relative paths are relative
    to the CSV's folder. Rows without a group get their own (the file name).

    Raises:
        DatalistError: missing columns, bad labels or missing files, naming the row.
    """
    path = Path(path)
    if not path.is_file():
        raise DatalistError(f"CSV not found: {path}")
    base = path.parent
    with open(path, newline="", encoding="utf-8-sig") as fp:
        reader = csv.DictReader(fp)
        columns = reader.fieldnames or []
        file_col = _pick(columns, _FILE_COLUMNS)
        label_col = _pick(columns, ("label", "class", "diagnosis"))
        if not file_col or not label_col:
            raise DatalistError(f"{path.name}: needs a file column ({'/'.join(_FILE_COLUMNS)}) and a label column; has {columns}")
        group_col = _pick(columns, _GROUP_COLUMNS)
        centre_col = _pick(columns, _CENTRE_COLUMNS)
        mask_col = _pick(columns, ("mask",))
        items = []
        for n, row in enumerate(reader, start=2):
            rel = (row.get(file_col) or "").strip()
            if not rel:
                raise DatalistError(f"{path.name} line {n}: empty file name")
            image = (base / rel).resolve()
            if require_exists and not image.is_file():
                raise DatalistError(f"{path.name} line {n}: image not found: {rel}")
            try:
                label = label_index(row.get(label_col, ""))
            except ValueError as e:
                raise DatalistError(f"{path.name} line {n}: {e}") from None
            item: dict[str, Any] = {
                "image": str(image),
                "label": label,
                "group": (row.get(group_col) or "").strip() if group_col else "",
                "centre": (row.get(centre_col) or "").strip() if centre_col else "",
            }
            item["group"] = item["group"] or image_id_of(rel)
            mask = (row.get(mask_col) or "").strip() if mask_col else ""
            if mask:
                item["mask"] = str((base / mask).resolve())
            items.append(item)
    if not items:
        raise DatalistError(f"{path.name}: no rows")
    return items


def _is_image_file(p: Path) -> bool:
    name = p.name.lower()
    return p.is_file() and not name.startswith(".") and any(name.endswith(s) for s in IMAGE_SUFFIXES)


def datalist_from_folder(root: os.PathLike | str) -> list[dict]:
    """``root/benign/*`` and ``root/malignant/*`` (any supported image type, searched
    recursively). A sub-folder below the class folder is taken as the case group; files directly
    in the class folder are their own group."""
    root = Path(root)
    if not root.is_dir():
        raise DatalistError(f"folder not found: {root}")
    items = []
    for index, name in enumerate(CLASS_NAMES):
        class_dir = root / name
        if not class_dir.is_dir():
            continue
        for p in sorted(class_dir.rglob("*")):
            if _is_image_file(p):
                rel = p.relative_to(class_dir)
                group = rel.parts[0] if len(rel.parts) > 1 else image_id_of(p)
                items.append({"image": str(p.resolve()), "label": index, "group": group, "centre": ""})
    if not items:
        raise DatalistError(f"{root}: no images in {'/ or '.join(CLASS_NAMES)}/ sub-folders")
    return items


def datalist_from_datastore(source: Any, require_diagnosis: bool = True) -> list[dict]:
    """Confirmed cases of a MONAI Label datastore.

    Args:
        source: a studies folder (its ``datastore_v2.json`` is read, nothing is written) or a
            datastore object with ``list_images``, ``get_image_info`` and ``get_image_uri``.
        require_diagnosis: only images whose info holds a ``diagnosis``; else all, with label -1.

    The image info fields used are ``diagnosis`` (benign/malignant), ``case`` (group; default the
    image id), ``centre`` and ``roi``; a ``final`` label file, when present, becomes ``mask``.
    """
    if isinstance(source, (str, os.PathLike)):
        records = _read_datastore_folder(Path(source))
    else:
        records = []
        for image_id in source.list_images():
            info = dict(source.get_image_info(image_id) or {})
            if require_diagnosis and info.get(DIAGNOSIS_FIELD) is None:
                continue  # not fetched: an archive-backed datastore downloads what get_image_uri names
            final = ""
            if hasattr(source, "get_label_uri"):
                try:
                    final = source.get_label_uri(image_id, "final") or ""
                except Exception:
                    final = ""
            records.append((image_id, source.get_image_uri(image_id), info, final))
    items = []
    for image_id, uri, info, final in sorted(records, key=lambda r: r[0]):
        diagnosis = info.get(DIAGNOSIS_FIELD)
        if diagnosis is None and require_diagnosis:
            continue
        try:
            label = label_index(diagnosis) if diagnosis is not None else -1
        except ValueError:
            continue  # an invalid stored value is not a confirmed case
        item = {
            "image": uri,
            "label": label,
            "group": str(info.get("case") or image_id),
            "centre": str(info.get("centre") or ""),
            "id": image_id,
        }
        if info.get("roi"):
            item["roi"] = list(info["roi"])
        if final and os.path.isfile(final):
            item["mask"] = final
        items.append(item)
    return items


def _read_datastore_folder(studies: Path) -> list[tuple[str, str, dict, str]]:
    config = studies / "datastore_v2.json"
    if not config.is_file():
        raise DatalistError(f"{studies} is not a MONAI Label studies folder (no datastore_v2.json)")
    try:
        store = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DatalistError(f"cannot read {config}: {e}") from None
    images_dir = studies / store.get("images_dir", ".")
    labels_dir = studies / store.get("labels_dir", "labels")
    records = []
    for image_id, obj in store.get("objects", {}).items():
        image = obj.get("image", {})
        uri = str((images_dir / f"{image_id}{image.get('ext', '')}").resolve())
        final = obj.get("labels", {}).get("final")
        final_path = str((labels_dir / "final" / f"{image_id}{final.get('ext', '')}").resolve()) if final else ""
        records.append((image_id, uri, dict(image.get("info", {})), final_path))
    return records


def load_datalist(source: os.PathLike | str) -> list[dict]:
    """A datalist from a CSV file, a ``benign/ malignant/`` folder or a MONAI Label studies
    folder, whichever ``source`` is."""
    p = Path(source)
    if p.is_file() or (p.suffix.lower() == ".csv" and not p.is_dir()):
        return datalist_from_csv(p)  # a missing CSV is reported as a missing CSV, not a missing folder
    if (p / "datastore_v2.json").is_file():
        return datalist_from_datastore(p)
    return datalist_from_folder(p)


def write_datalist_csv(datalist: Sequence[Mapping], path: os.PathLike | str) -> None:
    """Write a datalist as a CSV that :func:`datalist_from_csv` reads back (paths relative to
    the CSV's folder), atomically."""
    import io as _io

    path = Path(path)
    base = path.parent.resolve()
    buf = _io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    has_mask = any(d.get("mask") for d in datalist)
    writer.writerow(["file", "label", "case", "centre"] + (["mask"] if has_mask else []))
    for d in datalist:
        row = [os.path.relpath(d["image"], base), CLASS_NAMES[int(d["label"])], d.get("group", ""), d.get("centre", "")]
        if has_mask:
            row.append(os.path.relpath(d["mask"], base) if d.get("mask") else "")
        writer.writerow(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue().encode())


def class_counts(datalist: Sequence[Mapping]) -> list[int]:
    """Number of items per class index."""
    c = Counter(int(d["label"]) for d in datalist)
    return [c.get(i, 0) for i in range(len(CLASS_NAMES))]


# ----------------------------------------------------------------------------------------- splits
def grouped_kfold(datalist: Sequence[Mapping], n_folds: int = 5, seed: int = 0) -> list[tuple[list[dict], list[dict]]]:
    """Stratified, case-grouped k-fold: ``[(train, test), ...]``; a group is on one side only.

    scikit-learn's ``StratifiedGroupKFold`` (shuffled with ``seed``) over the groups, each
    labelled malignant if any of its frames is: the folds balance the number of benign and of
    malignant cases (the clinically relevant unit), whatever their frame counts.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if n_folds < 2:
        raise ValueError("n_folds must be at least 2")
    label_of: dict[str, int] = {}
    for d in datalist:
        g = str(d["group"])
        label_of[g] = max(label_of.get(g, 0), int(d["label"]))
    names = sorted(label_of)
    if len(names) < n_folds:
        raise DatalistError(f"{len(names)} groups cannot make {n_folds} folds")
    labels = [label_of[g] for g in names]
    if max(labels.count(0), labels.count(1)) >= n_folds:
        folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(names, labels, names)
    else:  # too few cases of either class to stratify (a small confirmed set): shuffled groups
        from sklearn.model_selection import KFold

        folds = KFold(n_splits=n_folds, shuffle=True, random_state=seed).split(names)
    result = []
    for _, test_groups in folds:
        tested = {names[i] for i in test_groups}
        result.append(([dict(d) for d in datalist if str(d["group"]) not in tested],
                       [dict(d) for d in datalist if str(d["group"]) in tested]))
    return result


def grouped_split(datalist: Sequence[Mapping], val_fraction: float = 0.2, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """One stratified, case-grouped split: ``(train, val)`` with about ``val_fraction`` of the
    groups in ``val``."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError("val_fraction must be between 0 and 1")
    n_folds = max(2, int(round(1.0 / val_fraction)))
    train, val = grouped_kfold(datalist, n_folds, seed)[0]
    return train, val


def cross_centre_split(
    datalist: Sequence[Mapping], train_centres: Sequence[str], test_centres: Optional[Sequence[str]] = None
) -> tuple[list[dict], list[dict]]:
    """Train on the images of ``train_centres``, test on ``test_centres`` (default: all others).

    Raises:
        DatalistError: a centre is unknown or a side is empty, or a group spans both sides.
    """
    known = {str(d.get("centre", "")) for d in datalist}
    wanted = set(train_centres) | set(test_centres or [])
    if wanted - known:
        raise DatalistError(f"unknown centres {sorted(wanted - known)}; the datalist has {sorted(known)}")
    test_set = set(test_centres) if test_centres else known - set(train_centres)
    train = [dict(d) for d in datalist if d.get("centre") in set(train_centres)]
    test = [dict(d) for d in datalist if d.get("centre") in test_set]
    if not train or not test:
        raise DatalistError("a cross-centre split needs images on both sides")
    overlap = {d["group"] for d in train} & {d["group"] for d in test}
    if overlap:
        raise DatalistError(f"{len(overlap)} groups were imaged at both a train and a test centre")
    return train, test


class FixedGroupSplit:
    """A train/validation split by group that never changes once made, persisted as JSON.

    The first call splits the groups it sees with :func:`grouped_split`; later calls keep every
    known group on its side and place new groups by a hash of ``(seed, group)``, so a retrain on
    more confirmed cases never moves a validation case into training.

    Args:
        path: the JSON file (written atomically), e.g. next to the published model.
        val_fraction: fraction of groups for validation.
        seed: seed of the first split and of the hash.
    """

    def __init__(self, path: os.PathLike | str, val_fraction: float = 0.2, seed: int = 0) -> None:
        self.path = Path(path)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)

    def _load(self) -> dict[str, str]:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
            return {str(k): str(v) for k, v in data.get("groups", {}).items()}
        except (OSError, ValueError, AttributeError):
            raise DatalistError(f"the split file {self.path} is damaged; move it away to start a new split") from None

    def _hash_side(self, group: str) -> str:
        digest = hashlib.sha256(f"{self.seed}:{group}".encode()).digest()
        return "val" if int.from_bytes(digest[:4], "big") / 2**32 < self.val_fraction else "train"

    def split(self, datalist: Sequence[Mapping]) -> tuple[list[dict], list[dict]]:
        """``(train, val)`` for ``datalist``; updates the file with any new groups."""
        assigned = self._load()
        groups = {str(d["group"]) for d in datalist}
        new = sorted(groups - set(assigned))
        if new:
            if not assigned:
                items = [d for d in datalist if str(d["group"]) in set(new)]
                try:
                    _, val = grouped_split(items, self.val_fraction, self.seed)
                    val_groups = {str(d["group"]) for d in val}
                except DatalistError:  # too few groups for a stratified split
                    val_groups = {g for g in new if self._hash_side(g) == "val"}
                assigned.update({g: ("val" if g in val_groups else "train") for g in new})
            else:
                assigned.update({g: self._hash_side(g) for g in new})
            self.path.parent.mkdir(parents=True, exist_ok=True)
            payload = {"val_fraction": self.val_fraction, "seed": self.seed, "groups": dict(sorted(assigned.items()))}
            atomic_write_bytes(self.path, json.dumps(payload, indent=1).encode())
        train = [dict(d) for d in datalist if assigned[str(d["group"])] == "train"]
        val = [dict(d) for d in datalist if assigned[str(d["group"])] == "val"]
        return train, val
