"""Sub-commands of the ``medplib`` CLI, one module each (see :mod:`monai_medplib.cli` for the contract)."""
