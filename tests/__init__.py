"""monai-medplib tests: unit/ (mirrors the package), integration/, e2e/, support/ (helpers)."""
