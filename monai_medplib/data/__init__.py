"""Data readers: MeCoVQA on the SA-Med2D-20M layout (``mecovqa``) and the demo dataset builder."""

from monai_medplib.data.mecovqa import (
    MeCoVQADataset,
    MeCoVQARecord,
    Turn,
    collate_mecovqa,
    ensure_merged_mask,
    read_mecovqa,
    resolve_image_path,
)

__all__ = [
    "MeCoVQADataset",
    "MeCoVQARecord",
    "Turn",
    "collate_mecovqa",
    "ensure_merged_mask",
    "read_mecovqa",
    "resolve_image_path",
]
