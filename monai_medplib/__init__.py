"""monai-medplib: a faithful, deepspeed-free re-implementation of MedPLIB for MONAI."""

from __future__ import annotations

import logging

__version__ = "0.1.0"

# torchao (the ``quant`` extra) is imported by transformers and MONAI whenever it is installed and logs, at import,
# that a CPU torch cannot load its CUDA extensions, plus a torch pytree deprecation: noise for every command.
for _name in ("torchao", "torch.utils._pytree"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.ERROR)

# Heavy names load on first use so that `import monai_medplib` (and `medplib --help`) stays fast.
_LAZY = {
    "MedPLIBPipeline": "monai_medplib.pipeline.medplib",
    "AnswerOptions": "monai_medplib.pipeline.options",
    "GroundingOptions": "monai_medplib.pipeline.options",
    "GroundingResult": "monai_medplib.pipeline.results",
    "VolumeGroundingResult": "monai_medplib.pipeline.results",
    "VolumeRegionAnswer": "monai_medplib.pipeline.results",
    "MedPLIBConfig": "monai_medplib.config",
    "load_medplib": "monai_medplib.checkpoint",
    "save_medplib": "monai_medplib.checkpoint",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'monai_medplib' has no attribute {name!r}")
