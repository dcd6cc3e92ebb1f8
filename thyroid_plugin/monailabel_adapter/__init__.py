"""The adapter between this library and MONAI Label: the only part of ``thyroid_plugin`` that
imports MONAI Label, and the only one that relies on its internals.

- :mod:`.compat`: the version guard (``WRITTEN_FOR``) of every MONAI Label internal the datastore
  here and the app's routes (``apps/thyroid_nodule/lib/routes``) use;
- :mod:`.datastore`: :class:`~.datastore.ConfirmedCasesDatastore`, MONAI Label's local datastore
  on the rules of :mod:`thyroid_plugin.studies`, and :func:`~.datastore.import_collection`
  (``thyroid-nodule import-studies``).

It lives in the library, not in the app, because the installed ``thyroid-nodule`` command
imports collections into a studies folder that the server later opens, and the app folder is
not part of the installed package.
"""

from .compat import WRITTEN_FOR, MonaiLabelVersionError, require
from .datastore import ConfirmedCasesDatastore, ImportedCases, import_collection

__all__ = ["ConfirmedCasesDatastore", "ImportedCases", "MonaiLabelVersionError", "WRITTEN_FOR", "import_collection", "require"]
