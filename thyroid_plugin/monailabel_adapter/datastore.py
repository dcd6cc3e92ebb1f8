"""MONAI Label's local datastore as the store of confirmed cases (see :mod:`thyroid_plugin.studies`
for the rules it applies).

:class:`ConfirmedCasesDatastore` is ``monailabel.datastore.local.LocalDatastore`` with:

- "labelled" meaning confirmed (so batch inference on labelled/unlabelled images and active
  learning work on diagnoses, not on segmentation files);
- image ids and label tags checked, so no request can read or write outside the studies folder;
- the datastore JSON, images and labels written atomically (a crash leaves the old or the new
  file, never half of one: each file is written under a hidden ``.partial`` name that no image
  pattern matches, flushed, then renamed; leftovers of a crash are removed when the datastore
  opens), the JSON re-read whenever another process (a background batch or training task, the
  import command) changed it, and every change made on the latest version under the datastore's
  file lock;
- images and labels checked to be readable 2D frames, and stored under an extension that fits
  their content (never one taken from the uploaded file name);
- diagnoses validated when they are stored, and no NaN or infinity in any stored info;
- a studies folder that cannot be written refused at once with a one-line
  :class:`~thyroid_plugin.studies.StudiesFolderError`.

It overrides or reads private members of ``LocalDatastore`` (listed in
:data:`.compat.DATASTORE_INTERNALS` and :data:`.compat.DATASTORE_STATE`); opening one checks
them first (:func:`.compat.require`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import ImageNotFoundException, MONAILabelException

from ..constants import CLASS_NAMES, DIAGNOSIS_FIELD
from ..errors import ThyroidPluginError, first_line
from ..io import atomic_copy_file, atomic_write_bytes, detect_format, load_image, stage_copy, sync_directory
from ..studies import (
    IMAGE_PATTERNS,
    StudiesFolderError,
    check_finite,
    check_id,
    check_label_fits,
    check_studies_folder,
    check_tag,
    file_stamp,
    import_entry,
    remove_partial_files,
    stored_suffix,
    studies_folder_error,
    validate_image_info,
)
from .compat import DATASTORE_INTERNALS, DATASTORE_STATE, require, require_attributes

logger = logging.getLogger(__name__)

__all__ = ["ConfirmedCasesDatastore", "ImportedCases", "import_collection"]

_PART = "the studies datastore (thyroid_plugin.monailabel_adapter.datastore)"


class ConfirmedCasesDatastore(LocalDatastore):
    """MONAI Label's :class:`LocalDatastore` hardened for this app (see the module docstring).

    Raises (when opened):
        MonaiLabelVersionError: the installed MONAI Label is not the one this was written for.
        StudiesFolderError: the folder cannot be used, or its datastore file is damaged.
    """

    def __init__(self, datastore_path: str, extensions: Sequence[str] = tuple(IMAGE_PATTERNS), auto_reload: bool = False,
                 read_only: bool = False) -> None:
        from filelock import FileLock

        require(_PART, DATASTORE_INTERNALS)
        check_studies_folder(datastore_path, writable=not read_only)
        self._writer_lock = FileLock(os.path.join(datastore_path, ".writer.lock"))
        if not read_only:
            self._remove_partial_files(datastore_path)
        try:
            super().__init__(datastore_path, extensions=list(extensions), auto_reload=auto_reload, read_only=read_only)
        except OSError as e:
            raise studies_folder_error(datastore_path, e) from None
        except ValueError as e:  # pydantic: the datastore JSON is not what MONAI Label wrote
            raise StudiesFolderError(
                f"the datastore file {self._datastore_config_path} is damaged ({first_line(e)}); restore it from a backup "
                "or move it away (it is then rebuilt from the image and label files, without their infos)") from None
        require_attributes(self, DATASTORE_STATE, _PART, "monailabel.datastore.local.LocalDatastore()")

    @property
    def path(self) -> str:
        """The studies folder."""
        return self._datastore_path

    @property
    def config_path(self) -> str:
        """The datastore file of the studies folder (``datastore_v2.json``)."""
        return self._datastore_config_path

    def _remove_partial_files(self, root: str) -> None:
        """Delete what interrupted atomic writes left behind, before MONAI Label's start-up
        reconciliation could take one of them for an image or a label. Runs under both datastore
        locks, so it never removes a file another process is writing right now."""
        from filelock import FileLock

        labels = os.path.join(root, "labels")
        folders = [root, labels]
        if os.path.isdir(labels):
            folders += [e.path for e in os.scandir(labels) if e.is_dir(follow_symlinks=False)]
        with self._writer_lock, FileLock(os.path.join(root, ".lock")):
            remove_partial_files(folders)

    # ----------------------------------------------------------- one truth: the file on disk
    def _sync(self) -> None:
        """Reload the datastore JSON if another process replaced it since we last read it."""
        try:
            ts = file_stamp(self._datastore_config_path)
        except FileNotFoundError:
            return
        if ts != self._config_ts:
            self._init_from_datastore_file()

    def _init_from_datastore_file(self, throw_exception: bool = False) -> None:
        """Read the datastore JSON if it differs from the version in memory (MONAI Label compares
        float ``st_mtime``, which two quick writes can share). The stamp comes from the open file,
        so it is the stamp of the version read, even if the file is replaced meanwhile."""
        from filelock import FileLock
        from monailabel.datastore.local import LocalDatastoreModel

        try:
            with FileLock(self._lock_file), open(self._datastore_config_path, "rb") as fp:
                stamp = file_stamp(fp.name, os.fstat(fp.fileno()))
                if stamp != self._config_ts:
                    model = LocalDatastoreModel.model_validate_json(fp.read())
                    model.base_path = self._datastore_path
                    self._datastore, self._config_ts = model, stamp
        except FileNotFoundError:
            return
        except ValueError as e:
            logger.error("cannot read the datastore file: %s", first_line(e))
            if throw_exception:
                raise

    def _locked_update(self, method, *args):
        # Our own lock file (MONAI Label's ``.lock`` is taken again inside the base methods, by
        # other FileLock objects, which filelock refuses to nest); one object per datastore, so
        # nested updates in a thread re-enter it.
        with self._writer_lock:
            self._sync()
            try:
                return method(*args)
            except BaseException:
                self._discard_unsaved()  # e.g. the disk is full: forget what was not written
                raise

    def _discard_unsaved(self) -> None:
        """Make the in-memory datastore the file on disk again (changes that were not written
        must not be shown, nor written later by another change)."""
        self._config_ts = 0
        if os.path.exists(self._datastore_config_path):
            self._init_from_datastore_file()
        else:
            self._datastore.objects.clear()

    def list_images(self):
        self._sync()
        return super().list_images()

    def get_image_info(self, image_id: str) -> Dict[str, Any]:
        self._sync()
        if image_id not in self._datastore.objects:
            check_id(image_id)  # an unknown id is {} (MONAI Label's answer) only if it is a valid one
        return super().get_image_info(image_id)

    def get_label_info(self, label_id: str, label_tag: str) -> Dict[str, Any]:
        self._sync()
        check_id(label_id, "label id")
        check_tag(label_tag)
        return super().get_label_info(label_id, label_tag)

    def get_labels_by_image_id(self, image_id: str) -> Dict[str, str]:
        self._sync()
        if image_id not in self._datastore.objects:
            check_id(image_id)
        return super().get_labels_by_image_id(image_id)

    def datalist(self, full_path=True):
        self._sync()
        return super().datalist(full_path)

    def json(self):
        self._sync()
        return super().json()

    # -------------------------------------------------------------------- confirmed = labelled
    def is_confirmed(self, image_id: str) -> bool:
        obj = self._datastore.objects.get(image_id)
        return bool(obj and obj.image.info.get(DIAGNOSIS_FIELD) in CLASS_NAMES)

    def get_labeled_images(self, label_tag: Optional[str] = None, labels: Optional[Sequence[str]] = None):
        self._sync()
        return [k for k in self._datastore.objects if self.is_confirmed(k)]

    def get_unlabeled_images(self, label_tag: Optional[str] = None, labels: Optional[Sequence[str]] = None):
        self._sync()
        return [k for k in self._datastore.objects if not self.is_confirmed(k)]

    def status(self) -> Dict[str, Any]:
        self._sync()
        s = super().status()
        s["completed"] = len(self.get_labeled_images())
        counts = {name: 0 for name in CLASS_NAMES}
        for obj in self._datastore.objects.values():
            d = obj.image.info.get(DIAGNOSIS_FIELD)
            if d in counts:
                counts[d] += 1
        s["diagnoses"] = counts
        return s

    # ------------------------------------------------------------------------ checked requests
    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        if image_id:
            check_id(image_id)
        else:
            image_id = check_id(self._to_id(os.path.basename(image_filename))[0])
        image = load_image(image_filename)  # only readable 2D frames enter the store (InvalidImageError otherwise)
        info = validate_image_info(image_info or {}, image.shape)
        del image
        # the stored file's extension says what it is (else the datastore would not find it
        # again after a restart), whatever the upload was called
        ext = stored_suffix(image_filename)
        return self._locked_update(self._store_image, image_id, image_filename, ext, info)

    def _store_image(self, image_id: str, src: str, ext: str, info: Dict[str, Any]) -> str:
        logger.info("adding image %s", image_id)
        name = self._filename(image_id, ext)
        old = self._datastore.objects.get(image_id)

        def record() -> None:  # the file is complete on disk: record it, then it takes its name
            info_ = dict(info, ts=int(time.time()), name=name)
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info_, ext=ext))
            self._update_datastore_file()

        atomic_copy_file(src, os.path.join(self._datastore.image_path(), name), before_replace=record)
        if old is not None and old.image.ext != ext:
            _remove_if_present(os.path.join(self._datastore.image_path(), self._filename(image_id, old.image.ext)))
        return image_id

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        check_tag(label_tag)
        checked = (image_id, label_filename, *self._checked_label(image_id, label_filename, label_info))
        if self._locked_update(self._store_labels, [checked], label_tag):
            raise ImageNotFoundException(f"Image {image_id} not found")  # removed since it was checked
        return image_id

    def save_labels(self, labels: Sequence[Tuple[str, str, Dict[str, Any]]], label_tag: str) -> Dict[str, str]:
        """Save several labels of one tag, each checked and written atomically as by
        :meth:`save_label`, with one write of the datastore file for all of them (a batch's
        results: rewriting the whole file per label made saving grow with the store).

        Args:
            labels: ``(image_id, label file, label info)``, one per image.

        Returns:
            the images whose label was not saved, each with a one-line reason (not an image of
            this store, a mask off the image's grid, ...); every other label is saved.

        Raises:
            OSError: a file or the record could not be written (a full disk): nothing is saved.
        """
        check_tag(label_tag)
        checked, errors = [], {}
        for image_id, filename, info in labels:
            try:
                checked.append((image_id, filename, *self._checked_label(image_id, filename, info)))
            except (ThyroidPluginError, MONAILabelException, OSError) as e:
                errors[image_id] = _reason(e)
        if checked:
            errors.update(self._locked_update(self._store_labels, checked, label_tag))
        return errors

    def _checked_label(self, image_id: str, label_filename: str, label_info: Dict[str, Any]):
        """``(stored suffix, info, whether it confirms a diagnosis)`` of a label file for
        ``image_id``, after checking it is a readable 2D mask on the stored image's grid."""
        check_id(image_id)
        info = dict(label_info or {})
        check_finite(info, "label info")
        image = self._stored_image(image_id)
        check_label_fits(load_image(label_filename), image)  # a readable 2D mask on the image's grid
        confirms = info.get(DIAGNOSIS_FIELD) is not None
        info = validate_image_info(info, image.shape)
        return stored_suffix(label_filename), info, confirms

    def _store_labels(self, checked, tag: str) -> Dict[str, str]:
        """Store checked labels (:meth:`_checked_label`): every file is staged (complete,
        flushed) next to its place, then all are recorded in one datastore write (a diagnosis
        goes into its image's info in the same write), then all take their names. A crash
        leaves every file old or whole; a failed write (a full disk) leaves everything as it
        was. Returns the images removed since they were checked."""
        label_dir = self._datastore.label_path(tag)
        os.makedirs(label_dir, exist_ok=True)
        staged, errors = [], {}
        try:
            for image_id, src, ext, info, confirms in checked:
                obj = self._datastore.objects.get(image_id)
                if obj is None:
                    errors[image_id] = f"image {image_id} not found"
                    continue
                name = self._filename(image_id, ext)
                staged.append((obj, image_id, name, ext, info, confirms, obj.labels.get(tag),
                               stage_copy(src, os.path.join(label_dir, name))))
            if not staged:
                return errors
            logger.info("saving %d label(s) %s", len(staged), tag)
            for obj, _, name, ext, info, confirms, _, _ in staged:
                obj.labels[tag] = DataModel(info=dict(info, ts=int(time.time()), name=name), ext=ext)
                if confirms and tag == DefaultLabelTag.FINAL.value:
                    obj.image.info[DIAGNOSIS_FIELD] = info[DIAGNOSIS_FIELD]
                    if info.get("roi") is not None:
                        obj.image.info["roi"] = info["roi"]
            self._update_datastore_file()
        except BaseException:
            for *_, file in staged:
                file.discard()
            raise
        for obj, image_id, _, ext, _, _, old, file in staged:
            file.commit(sync=False)
            if old is not None and old.ext != ext:
                _remove_if_present(os.path.join(label_dir, self._filename(image_id, old.ext)))
        sync_directory(label_dir)
        return errors

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        check_id(image_id)
        shape = None
        if isinstance(info, Mapping) and info.get("roi") is not None:
            shape = self._stored_image(image_id).shape  # the box must lie on this image
        return self._locked_update(super().update_image_info, image_id, validate_image_info(info, shape))

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        check_id(label_id, "label id")
        check_tag(label_tag)
        info = validate_image_info(info)  # the same rules for diagnosis, roi, ts and name
        return self._locked_update(super().update_label_info, label_id, label_tag, info)

    def _stored_image(self, image_id: str):
        """The stored frame of ``image_id`` (:class:`ImageNotFoundException` if there is none)."""
        self._sync()
        obj = self._datastore.objects.get(image_id)
        if obj is None:
            raise ImageNotFoundException(f"Image {image_id} not found")
        return load_image(os.path.join(self._datastore.image_path(), self._filename(image_id, obj.image.ext)))

    def get_image_uri(self, image_id: str) -> str:
        check_id(image_id)
        self._sync()
        return super().get_image_uri(image_id)

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        check_id(label_id, "label id")
        check_tag(label_tag)
        self._sync()
        return super().get_label_uri(label_id, label_tag)

    def remove_image(self, image_id: str) -> None:
        check_id(image_id)
        return self._locked_update(super().remove_image, image_id)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        check_id(label_id, "label id")
        check_tag(label_tag)
        return self._locked_update(super().remove_label, label_id, label_tag)

    # ---------------------------------------------------------------------------- atomic file
    def _update_datastore_file(self, lock: bool = True) -> None:
        from filelock import FileLock

        def write() -> None:
            self._ignore_event_config = True
            atomic_write_bytes(self._datastore_config_path, _datastore_json(self._datastore))
            self._config_ts = file_stamp(self._datastore_config_path)

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()


def _datastore_json(datastore) -> bytes:
    """The datastore file's content: MONAI Label's layout (indented JSON, no ``base_path``),
    written by pydantic's serializer (about 8x faster than ``json.dumps`` with an indent, which
    runs in pure Python: 90 ms for a store of 1,000 images with a result each); ``json.dumps``
    as MONAI Label does it for infos pydantic cannot serialize."""
    from pydantic_core import PydanticSerializationError

    try:
        return datastore.model_dump_json(exclude={"base_path"}, indent=2).encode()
    except PydanticSerializationError:
        return json.dumps(datastore.model_dump(exclude={"base_path"}), indent=2, default=str).encode()


def _reason(error: BaseException) -> str:
    """One line for a label that was not saved (MONAI Label's exceptions keep it in ``msg``)."""
    return first_line(getattr(error, "msg", None) or error)


def _remove_if_present(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@dataclass(frozen=True)
class ImportedCases:
    """What :func:`import_collection` added: the ids of the imported images, and of those whose
    expert mask was imported as their ``final`` label."""

    ids: list[str]
    masks: list[str]


def import_collection(datalist: Sequence[Mapping[str, Any]], studies: os.PathLike | str, with_diagnosis: bool = True) -> ImportedCases:
    """Copy the images of ``datalist`` into a studies folder as (confirmed) cases.

    Ids and infos are :func:`thyroid_plugin.studies.import_entry`'s (``diagnosis`` unless
    ``with_diagnosis`` is false). Images already present with the same id are left as they are.
    A confirmed item's expert ``mask`` becomes its ``final`` label (the server's retraining cuts
    the case around it); a mask that does not fit its image is left out with a warning.

    Returns:
        the ids of the imported images and of those whose mask was imported.
    """
    store = ConfirmedCasesDatastore(str(check_studies_folder(studies)))
    taken = set(store.list_images())
    ids, masks = [], []
    for item in datalist:
        detect_format(item["image"])  # refuse non-images before anything is written
        image_id, info = import_entry(item, with_diagnosis)
        if image_id in taken:
            continue
        store.add_image(image_id, str(item["image"]), info)
        taken.add(image_id)
        ids.append(image_id)
        if item.get("mask") and DIAGNOSIS_FIELD in info:
            masks.append((image_id, str(item["mask"]), {"source": str(item["mask"])}))
    refused = store.save_labels(masks, DefaultLabelTag.FINAL.value) if masks else {}
    for image_id, reason in refused.items():
        logger.warning("%s: its mask was not imported (%s)", image_id, reason)
    return ImportedCases(ids, [image_id for image_id, _, _ in masks if image_id not in refused])
