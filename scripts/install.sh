#!/usr/bin/env bash
# Creates .venv and installs monai-medplib with everything its tests, bundle and MONAI Label app need.
# Order matters (see README "Installation"): the CPU torch first, then the stack, then monailabel without
# its dependency tree (which would pull torchvision, sam2 and a CUDA torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip wheel setuptools
"${PIP[@]}" -c requirements/constraints.txt torch
"${PIP[@]}" -c requirements/constraints.txt -r requirements/core.txt -r requirements/app.txt -r requirements/dev.txt
"${PIP[@]}" --no-deps -c requirements/constraints.txt monailabel pydicom-seg liver-ct-segmentation-package
"${PIP[@]}" --no-deps -e .
# pydicom-seg (imported by MONAI Label) still imports a module pydicom 3 removed: alias it at start-up,
# so that a plain `monailabel start_server` works as well as `medplib serve`.
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import monai_medplib.adapters.monailabel.pydicom_compat as m; m.install()" > "$SITE/monai_medplib_pydicom_compat.pth"
# torchvision breaks peft and transformers' LLaMA beside the CPU torch: it must not be there.
if "$VENV/bin/python" -m pip show torchvision >/dev/null 2>&1; then
  echo "torchvision got installed; removing it" >&2
  "$VENV/bin/python" -m pip uninstall -y -q torchvision
fi
"$VENV/bin/python" -c "import torch, transformers, peft, monai, monai_medplib; print('monai-medplib installed:', monai_medplib.__version__, 'torch', torch.__version__)"
# The PACS / browser test stack (Orthanc + DICOMweb, Chromium, OHIF's prebuilt viewer) comes from Debian
# packages and npm, so it needs root; without it those tests skip (CI runs as root and requires them).
if [ "$(id -u)" -eq 0 ] && [ "${MEDPLIB_SKIP_E2E:-0}" != 1 ]; then
  bash scripts/install_e2e.sh
else
  echo "not installing Orthanc / Chromium / OHIF (needs root: sudo bash scripts/install_e2e.sh)" >&2
fi
