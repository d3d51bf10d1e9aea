#!/usr/bin/env bash
# Debian tools the node is tested against: dcmtk (storescu, storescp, echoscu, findscu, dsr2html),
# dicom3tools (dciodvfy) and Orthanc (a PACS that receives the result objects; the tests run their own
# Orthanc process, the packaged service is not used). Installs only what is missing; needs root (or sudo).
set -euo pipefail
missing=()
command -v /usr/bin/storescp >/dev/null 2>&1 || missing+=(dcmtk)
command -v /usr/bin/dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)
command -v /usr/sbin/Orthanc >/dev/null 2>&1 || missing+=(orthanc)
# Headless Chromium for the triage page's browser test.
command -v /usr/bin/chromium >/dev/null 2>&1 || missing+=(chromium)
command -v /usr/bin/chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
