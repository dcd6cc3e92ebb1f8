#!/usr/bin/env bash
# Install Orthanc and its DICOMweb plugin (Debian packages `orthanc`, `orthanc-dicomweb`), which
# the archive tests (tests/pacs) start on loopback ports of their own. Needs root for apt-get
# (CI and a fresh machine run as root); a non-root user runs `sudo scripts/setup_pacs.sh`.
# The Debian package also installs a system Orthanc service; it is left as the system has it.
# Does nothing when both are already installed.
set -euo pipefail
plugin=/usr/share/orthanc/plugins/libOrthancDicomWeb.so
if command -v Orthanc >/dev/null 2>&1 && [ -f "$plugin" ]; then
  exit 0
fi
if [ "$(id -u)" != "0" ]; then
  echo "Orthanc with its DICOMweb plugin is not installed; as root run: sudo $0" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q orthanc orthanc-dicomweb >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q orthanc orthanc-dicomweb >/dev/null; }
command -v Orthanc >/dev/null 2>&1 && [ -f "$plugin" ] || { echo "Orthanc or its DICOMweb plugin is missing after apt-get" >&2; exit 1; }
echo "installed $(Orthanc --version | head -1) with the DICOMweb plugin" >&2
