#!/usr/bin/env bash
# Creates .venv and installs monai-medplib from this clone the way README "Installation" tells users to, plus the
# dev extra and the test stack:
#   1. torch first (the CPU build here; TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu on a machine whose
#      pip would otherwise fetch a CUDA build), so that nothing later swaps it;
#   2. monai-medplib with its app, demo and quant extras (editable here, from the wheel for users);
#   3. monailabel, pydicom-seg and the demo CT package without their dependency trees (they would pull torchvision,
#      sam2, a CUDA torch or torch 1.7).
# requirements/constraints.txt pins the versions the project is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip wheel setuptools
# README step 1
"${PIP[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0
# README step 2 (users: pip install "monai_medplib-<version>-py3-none-any.whl[app,demo,quant]")
"${PIP[@]}" -c requirements/constraints.txt -e ".[app,demo,quant,dev]"
# README step 3
"${PIP[@]}" -c requirements/constraints.txt --no-deps monailabel==0.8.5 pydicom-seg==0.4.1 \
  liver-ct-segmentation-package==1.6.0
# The wheel ships the pydicom 3 start-up hook (.pth) that lets a plain `monailabel start_server` import pydicom-seg;
# an editable install does not, so write the same file here.
"$VENV/bin/python" - <<'EOF'
import sysconfig
from pathlib import Path

from monai_medplib.adapters.shipped import STARTUP_HOOK

name, line = STARTUP_HOOK
Path(sysconfig.get_paths()["purelib"], name).write_text(line)
EOF
# torchvision breaks peft and transformers' LLaMA beside the CPU torch: it must not be there.
if "$VENV/bin/python" -m pip show torchvision >/dev/null 2>&1; then
  echo "torchvision got installed; removing it" >&2
  "$VENV/bin/python" -m pip uninstall -y -q torchvision
fi
"$VENV/bin/python" -c "import torch, transformers, peft, monai, monai_medplib; print('monai-medplib installed:', monai_medplib.__version__, 'torch', torch.__version__)"
# The PACS / browser / DICOM-validator test stack (Orthanc + DICOMweb, Chromium, OHIF's prebuilt viewer, dicom3tools)
# comes from Debian packages and npm, so it needs root; without it those tests skip (CI runs as root and requires
# them).
if [ "$(id -u)" -eq 0 ] && [ "${MEDPLIB_SKIP_E2E:-0}" != 1 ]; then
  bash scripts/install_e2e.sh
else
  echo "not installing Orthanc / Chromium / OHIF / dicom3tools (needs root: sudo bash scripts/install_e2e.sh)" >&2
fi
