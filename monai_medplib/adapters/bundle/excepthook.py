"""Importing this module routes uncaught exceptions of a bundle run through the one-line report of
:mod:`monai_medplib.adapters.bundle.errors` (every config lists it first in ``imports``; a library import of the
bundle adapters changes nothing)."""

from .errors import install_excepthook

install_excepthook()
