#!/usr/bin/env bash
# Installs what the browser end-to-end test (tests/e2e/test_ohif.py) needs on a Debian machine, as root:
#   - Orthanc with its DICOMweb plugin (the PACS the viewer and MONAI Label talk to),
#   - Chromium (driven headless by Playwright Python; Playwright's own browser download is not used),
#   - OHIF's prebuilt viewer, the npm package @ohif/app (only its dist/ folder is used),
#   - dicom3tools, whose dciodvfy checks the DICOM series and SEGs we write (tests/integration/test_dicom_conformance.py).
# Idempotent: every step is skipped when its result is already there.
# Env: OHIF_VERSION (default 3.13.2), MEDPLIB_OHIF_CACHE (default ~/.cache/monai-medplib/ohif).
set -euo pipefail
cd "$(dirname "$0")/.."

OHIF_VERSION=${OHIF_VERSION:-3.13.2}
OHIF_CACHE=${MEDPLIB_OHIF_CACHE:-$HOME/.cache/monai-medplib/ohif}
DICOMWEB_PLUGIN=/usr/share/orthanc/plugins/libOrthancDicomWeb.so

need_apt=()
command -v Orthanc >/dev/null 2>&1 || need_apt+=(orthanc)
[ -f "$DICOMWEB_PLUGIN" ] || need_apt+=(orthanc-dicomweb)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
command -v dciodvfy >/dev/null 2>&1 || need_apt+=(dicom3tools)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install_e2e.sh: need root to apt-get install ${need_apt[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

# The Debian package would start Orthanc as a service on 0.0.0.0:8042 on machines with systemd; the tests start
# their own instance on a free 127.0.0.1 port, so a running service is harmless but not needed.

viewer_dir="$OHIF_CACHE/$OHIF_VERSION/package/dist"
if [ ! -f "$viewer_dir/index.html" ]; then
  mkdir -p "$OHIF_CACHE/$OHIF_VERSION"
  tmp=$(mktemp -d)
  # npm pack fetches the published tarball only (no dependency install, no build).
  (cd "$tmp" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
  tarball=$(ls "$tmp"/*.tgz)
  rm -rf "$OHIF_CACHE/$OHIF_VERSION/package"
  tar -xzf "$tarball" -C "$OHIF_CACHE/$OHIF_VERSION" package/dist package/package.json
  rm -rf "$tmp"
  [ -f "$viewer_dir/index.html" ] || { echo "install_e2e.sh: $viewer_dir/index.html missing after npm pack" >&2; exit 1; }
fi

echo "e2e stack ready: $(Orthanc --version 2>/dev/null | head -1), $(chromium --version 2>/dev/null), OHIF $OHIF_VERSION at $viewer_dir, $(command -v dciodvfy)"
