"""pydicom 3 compatibility for pydicom-seg 0.4.1 (imported by MONAI Label 0.8.5).

pydicom-seg imports ``pydicom._storage_sopclass_uids``, which pydicom 3 removed (the UIDs now live in
``pydicom.uid``). :func:`install` appends an import hook that serves that module name from ``pydicom.uid``
only when no real module exists, so pydicom 2 is untouched. ``scripts/install.sh`` puts a ``.pth`` file
in the virtual environment that calls it at interpreter start, which makes a plain
``monailabel start_server --app apps/medplib`` work too; the hook imports nothing until the name is asked for.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

ALIASED = "pydicom._storage_sopclass_uids"


class _SopClassAliasLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        import pydicom.uid

        module = types.ModuleType(spec.name, "pydicom 2 SOP class UID names, served from pydicom.uid")
        for name in dir(pydicom.uid):
            value = getattr(pydicom.uid, name)
            if isinstance(value, pydicom.uid.UID):
                setattr(module, name, value)
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: create_module filled the names."""


class _SopClassAliasFinder(importlib.abc.MetaPathFinder):
    """Last on ``sys.meta_path``: answers only for :data:`ALIASED`, after the real finders found nothing."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: D401 - importlib protocol
        if fullname != ALIASED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _SopClassAliasLoader())


def install() -> None:
    """Register the alias hook once (idempotent)."""
    if not any(isinstance(finder, _SopClassAliasFinder) for finder in sys.meta_path):
        sys.meta_path.append(_SopClassAliasFinder())
