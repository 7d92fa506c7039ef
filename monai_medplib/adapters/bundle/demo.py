"""The bundle's default data: the demo dataset (LiTS CT and MNI152 MR slices in the MeCoVQA layout), built on first use.

``configs/evaluate.json`` and ``configs/train.json`` default ``dataset_dir`` to ``<bundle_root>/data/demo``; this
builds the split there when it is missing, from the LiTS CT of ``liver-ct-segmentation-package`` and the MNI152
files of ``nilearn`` (README "Installation"), so that the default commands run as written.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

__all__ = ["demo_split"]

logger = logging.getLogger(__name__)

# the release file of each split that the evaluator / trainer read first (present once the split is built)
_MARKERS = {"train": "train/MeCoVQA-Grounding.json", "test": "test/MeCoVQA_Grounding_test.json"}


def demo_split(folder: str | Path, splits: Sequence[str] = ("test",)) -> str:
    """``folder``, holding the demo dataset's ``splits`` (built there when one of them is missing)."""
    from ...data.demo_dataset import RECIPE_DATA, build_demo_dataset

    root = Path(folder)
    unknown = sorted(set(splits) - set(_MARKERS))
    if unknown:
        raise ValueError(f"splits must be among {sorted(_MARKERS)}, got {unknown}")
    # a split built alone leaves the other split's files empty ("[]"): an empty marker is a missing split
    missing = [s for s in splits if not _has_entries(root / _MARKERS[s])]
    if missing:
        # keep the splits already there: a build writes every split's files
        keep = [s for s in _MARKERS if s in splits or _has_entries(root / _MARKERS[s])]
        logger.info("building the demo dataset (%s) into %s", ", ".join(keep), root)
        build_demo_dataset(root, splits=tuple(keep), **RECIPE_DATA)  # the held-out set of the model card
    return str(root)


def _has_entries(path: Path) -> bool:
    import json

    try:
        return path.is_file() and bool(json.loads(path.read_text()))
    except ValueError:  # a damaged file: build again
        return False
