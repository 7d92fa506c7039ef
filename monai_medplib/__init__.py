"""monai-medplib: a faithful, deepspeed-free re-implementation of MedPLIB for MONAI."""

__version__ = "0.1.0"
