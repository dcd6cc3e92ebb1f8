"""The one check of the MONAI Label internals this project relies on.

The datastore (:mod:`.datastore`) and the app's request handling (``apps/thyroid_nodule/lib/routes``)
subclass or replace parts of MONAI Label that are not its public API: private attributes of
``LocalDatastore``, the endpoint functions behind ``/infer`` and ``/auth``, the clean-up task of
uploads. They were written for MONAI Label :data:`WRITTEN_FOR`. :func:`require` runs when each of
them starts and stops it with a one-line :class:`MonaiLabelVersionError` that names what changed,
instead of a wrong answer or a traceback in the middle of a request.

To move to another MONAI Label version: read the release's changes of the names listed in
:data:`DATASTORE_INTERNALS` and :data:`ROUTE_INTERNALS`, adapt the code that uses them, run
``tests/app`` and ``tests/reliability``, then change :data:`WRITTEN_FOR`.
"""

from __future__ import annotations

import importlib
from typing import Iterable, Mapping, Sequence

from ..errors import ThyroidPluginError

#: the MONAI Label release the datastore and the route overrides were written and tested for
WRITTEN_FOR = "0.8.5"

#: ``module[:class]`` -> names the datastore subclass uses (methods it overrides or calls)
DATASTORE_INTERNALS: Mapping[str, Sequence[str]] = {
    "monailabel.datastore.local:LocalDatastore": ("_init_from_datastore_file", "_update_datastore_file", "_to_id",
                                                  "_filename", "_reconcile_datastore"),
    "monailabel.datastore.local": ("LocalDatastoreModel", "ImageLabelModel", "DataModel"),
}
#: attributes a ``LocalDatastore`` sets in its ``__init__`` that the subclass reads or replaces
DATASTORE_STATE = ("_datastore", "_datastore_path", "_datastore_config_path", "_lock_file", "_config_ts",
                   "_ignore_event_config")
#: ``module[:class]`` -> names the app's route overrides call or replace
ROUTE_INTERNALS: Mapping[str, Sequence[str]] = {
    "monailabel.endpoints.infer": ("run_inference", "ResultType"),
    "monailabel.utils.others.generic": ("remove_file",),  # the background task that deletes a spooled upload
    "monailabel.endpoints.user.auth": ("get_current_user", "oauth2_scheme", "get_public_key", "token_uri", "RBAC",
                                       "User"),
    "monailabel.interfaces.app:MONAILabelApp": ("_load_sessions",),
    "monailabel.interfaces.utils.app": ("app_instance",),
}


class MonaiLabelVersionError(ThyroidPluginError, RuntimeError):
    """The installed MONAI Label is not the one the adapters were written for (one line)."""


def installed_version() -> str:
    import monailabel

    return str(getattr(monailabel, "__version__", "unknown"))


def require(part: str, internals: Mapping[str, Sequence[str]]) -> None:
    """Check the MONAI Label version and that ``internals`` exist.

    Args:
        part: what relies on them, for the message (e.g. ``"the studies datastore"``).
        internals: ``"module"`` or ``"module:Class"`` -> attribute names.

    Raises:
        MonaiLabelVersionError: another version is installed, or one of the names is missing.
    """
    version = installed_version()
    if version != WRITTEN_FOR:
        raise MonaiLabelVersionError(
            f"MONAI Label {version} is installed, but {part} was written for MONAI Label {WRITTEN_FOR} (it uses "
            f"internals that change between releases): install monailabel=={WRITTEN_FOR}, or port "
            f"thyroid_plugin/monailabel_adapter/compat.py and what it guards")
    for location, names in internals.items():
        module_name, _, class_name = location.partition(":")
        try:
            owner = importlib.import_module(module_name)
            owner = getattr(owner, class_name) if class_name else owner
        except (ImportError, AttributeError):
            raise MonaiLabelVersionError(f"MONAI Label {version} has no {location.replace(':', '.')}, which {part} "
                                         "relies on") from None
        require_attributes(owner, names, part, location.replace(":", "."))


def require_attributes(obj: object, names: Iterable[str], part: str, where: str) -> None:
    """Raise :class:`MonaiLabelVersionError` naming the first of ``names`` that ``obj`` lacks."""
    missing = [name for name in names if not hasattr(obj, name)]
    if missing:
        raise MonaiLabelVersionError(f"MONAI Label {installed_version()} has no {where}.{', '.join(missing)}, which "
                                     f"{part} relies on (written for {WRITTEN_FOR})")
