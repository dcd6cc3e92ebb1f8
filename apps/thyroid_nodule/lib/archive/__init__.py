"""The hospital archive (a DICOMweb PACS such as Orthanc) as the app's datastore.

Selected when ``--studies`` is an ``http(s)://`` DICOMweb root. Modules:

- :mod:`.client`: DICOMweb traffic (``dicomweb-client``) with bounded timeouts, credentials from
  the environment, and archive failures mapped to 502/503/504;
- :mod:`.frames`: image ids <-> archive UIDs and frame, one frame of an instance as a file, the
  bounded local cache;
- :mod:`.reports`: the DICOM objects written back (TID 1500 Comprehensive SR of a result or of a
  confirmed diagnosis, saliency as SEG) and read back;
- :mod:`.results`: single classification results written to the archive in the background;
- :mod:`.datastore`: MONAI Label's datastore interface over all of it.
"""

from .client import ArchiveClient, ArchiveError, is_archive_url

__all__ = ["ArchiveClient", "ArchiveError", "is_archive_url"]
