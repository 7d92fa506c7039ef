"""Where the MONAI Label app and the MONAI Bundle are: their copies inside an installed wheel, or the clone's folders.

The repository's top-level ``apps/medplib/`` and ``bundle/`` are the source of truth. Building a wheel
(``setup.py``, which reads the layout below from this file) copies them into ``monai_medplib/_shipped/app`` and
``monai_medplib/_shipped/bundle``; an editable install (``pip install -e .``) ships nothing and the clone's
folders are found in place. This module imports only the standard library, so that ``setup.py`` can load it
without the package's dependencies.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["EXCLUDED", "SHIPPED", "SHIPPED_DIR", "STARTUP_HOOK", "shipped_dir"]

# name inside the wheel -> (folder of the repository, a file that marks it as complete)
SHIPPED = {
    "app": ("apps/medplib", "main.py"),
    "bundle": ("bundle", "configs/metadata.json"),
}
SHIPPED_DIR = "_shipped"
# Run-time folders that MONAI Label (logs, model, bin) and the bundle (eval, models, data) create beside the sources.
EXCLUDED = ("logs", "model", "bin", "eval", "models", "data", "__pycache__", "*.pyc", ".*")
# Written into site-packages by the wheel (and by scripts/install.sh for an editable install): pydicom-seg, imported
# by MONAI Label, needs a module pydicom 3 removed, and MONAI Label imports it before any app code runs, so a
# plain `monailabel start_server` needs the alias installed at interpreter start. The hook imports nothing until
# that module name is asked for.
STARTUP_HOOK = (
    "monai_medplib_pydicom_compat.pth",
    "import monai_medplib.adapters.monailabel.pydicom_compat as m; m.install()\n",
)

_PACKAGE = Path(__file__).resolve().parents[1]


def shipped_dir(name: str) -> Path:
    """The folder of ``name`` ("app" or "bundle"): the wheel's copy if installed from one, else the clone's.

    Raises:
        FileNotFoundError: neither exists (a source tree without the folder, or a broken install).
    """
    if name not in SHIPPED:
        raise ValueError(f"unknown shipped folder {name!r}; known: {sorted(SHIPPED)}")
    source, marker = SHIPPED[name]
    candidates = (_PACKAGE / SHIPPED_DIR / name, _PACKAGE.parent / source)
    for folder in candidates:
        if (folder / marker).is_file():
            return folder
    raise FileNotFoundError(
        f"the MedPLIB {name} was not found (looked for {' and '.join(str(c / marker) for c in candidates)}); "
        "reinstall monai-medplib from its wheel, or install it from a clone with pip install -e ."
    )
