"""Build the demo dataset: the LiTS CT of ``liver-ct-segmentation-package`` as MeCoVQA-style 2D data.

The 128^3 volume (label 0 background, 1 liver, 2 tumour) is normalised to 8 bit the SA-Med2D way and cut along
all three planes with the project transforms. Every slice becomes ``images/<stem>.png`` with the SA-Med2D name
``ct_00--LiTS--case_117--<x|y|z>_<index:04d>`` (x = sagittal, y = coronal, z = axial), class masks
``masks_merged/<stem>--<class:04d>_merged.png`` (0001 liver incl. tumour, 0002 tumour) and region prompts
``masks/<stem>--region_<k>.png``, and three kinds of conversations in the release JSON layout:

* grounding: "Please segment the liver." (several phrasings; tumour too) -> ``<SEG><mask>PATH</mask>``;
* closed VQA: is a tumour / the liver visible (yes / no), which plane is this (axial / coronal / sagittal);
* region VQA: "What is inside <region>PATH</region>?" -> liver / tumour / background, regions being discs that
  lie (almost) entirely inside one label.

Held-out split (whole slabs, not neighbouring slices): per plane, the contiguous block of
``round(0.2 * n)`` slices centred in the volume is the test set; ``gap`` slices on either side are used
nowhere; the rest is training. Both sets come from the one LiTS case, so this measures generalisation to
unseen slabs of the same patient, not to new patients.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

# SA-Med2D axis letter per plane (x: sagittal slices, y: coronal, z: axial).
PLANE_LETTER = {"sagittal": "x", "coronal": "y", "axial": "z"}
CASE_PREFIX = "ct_00--LiTS--case_117"
LIVER_CLASS, TUMOUR_CLASS = 1, 2
MIN_LIVER_PIXELS = 64  # grounding / "visible" needs at least this many pixels (0.4 % of a 128^2 slice)
MIN_TUMOUR_PIXELS = 32
REGION_RADIUS = 6

GROUNDING_PHRASES = (
    "Please segment the {target}.",
    "Segment the {target} in this image.",
    "Can you segment the {target}?",
    "Where is the {target}? Please output the mask.",
    "Please provide a segmentation of the {target}.",
    "Show me the {target} in this CT slice.",
    "Outline the {target}.",
    "Could you mark the {target} in this scan?",
)
TARGET_NAMES = {LIVER_CLASS: ("liver",), TUMOUR_CLASS: ("liver tumour", "tumour", "liver lesion")}
TUMOUR_QUESTIONS = (
    "Is a tumour visible in this image?",
    "Does this slice show a liver tumour?",
    "Is there a lesion in the liver?",
    "Can you see a tumour in this CT slice?",
)
LIVER_QUESTIONS = (
    "Is the liver visible in this image?",
    "Does this slice show the liver?",
    "Can you see the liver in this CT slice?",
)
PLANE_QUESTIONS = (
    "Which plane is this image: axial, coronal or sagittal?",
    "In which plane was this slice taken?",
    "Is this an axial, coronal or sagittal slice?",
)
REGION_QUESTIONS = (
    "What is inside <region>{path}</region>?",
    "What does the region <region>{path}</region> show?",
    "Which tissue is in <region>{path}</region>?",
)
REGION_ANSWERS = {0: "background", LIVER_CLASS: "liver", TUMOUR_CLASS: "tumour"}


@dataclass(frozen=True)
class SlabSplit:
    """Slice indices of one plane: ``test`` (held-out block), ``gap`` (unused) and ``train``."""

    train: tuple[int, ...]
    gap: tuple[int, ...]
    test: tuple[int, ...]


def slab_split(num_slices: int, test_fraction: float = 0.2, gap: int = 3) -> SlabSplit:
    """Central held-out block of ``round(test_fraction * num_slices)`` slices with ``gap`` unused on each side."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    size = max(1, round(test_fraction * num_slices))
    start = (num_slices - size) // 2
    test = range(start, start + size)
    gap_ids = [*range(max(0, start - gap), start), *range(start + size, min(num_slices, start + size + gap))]
    train = [i for i in range(num_slices) if i not in test and i not in gap_ids]
    return SlabSplit(tuple(train), tuple(gap_ids), tuple(test))


def load_lits_planes() -> Iterator[tuple[str, list[np.ndarray], list[np.ndarray]]]:
    """Yield ``(plane, images uint8 [H,W] per slice, labels uint8 [H,W] per slice)`` for the three planes."""
    from monai.data import MetaTensor

    from ..transforms.intensity import SAMed2DNormalize
    from ..transforms.slicing import ExtractSlices
    from .lits import load_lits_case

    case = load_lits_case()
    image = MetaTensor(case.image[None].astype(np.float32), affine=case.affine)
    label = MetaTensor(case.label[None].astype(np.float32), affine=case.affine)
    image8 = SAMed2DNormalize()(image)
    for plane in PLANE_LETTER:
        images = [np.asarray(s[0]).astype(np.uint8) for s in ExtractSlices(plane)(image8)]
        labels = [np.asarray(s[0]).round().astype(np.uint8) for s in ExtractSlices(plane)(label)]
        yield plane, images, labels


def _save_png(array: np.ndarray, path: Path, rgb: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if rgb:  # SA-Med2D CT PNGs: 8-bit, three identical channels
        array = np.repeat(array[..., None], 3, axis=-1)
    Image.fromarray(array).save(path)


def _disc(shape: tuple[int, int], centre: tuple[int, int], radius: int) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return ((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) <= radius**2


def region_masks(label: np.ndarray, rng: random.Random) -> list[tuple[int, np.ndarray]]:
    """One disc per class present: its centre lies at least ``0.7 * REGION_RADIUS`` px inside that class."""
    out = []
    for cls in (0, LIVER_CLASS, TUMOUR_CLASS):
        inside = label == cls
        depth = ndimage.distance_transform_edt(inside)
        candidates = np.argwhere(depth >= 0.7 * REGION_RADIUS)
        if cls == 0:  # background discs: keep them near the liver, not in the empty corners only
            near = ndimage.binary_dilation(label > 0, iterations=12)
            candidates = (
                np.array([c for c in candidates if near[c[0], c[1]]]) if len(candidates) else candidates
            )
        if len(candidates) == 0:
            continue
        centre = tuple(int(v) for v in candidates[rng.randrange(len(candidates))])
        out.append((cls, _disc(label.shape, centre, REGION_RADIUS) & (depth > 0)))
    return out


def _conversation(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]


def slice_entries(
    plane: str, index: int, image: np.ndarray, label: np.ndarray, root: Path, rng: random.Random
) -> dict[str, list[dict]]:
    """Write the PNGs of one slice and return its entries per task (grounding, closed, region)."""
    stem = f"{CASE_PREFIX}--{PLANE_LETTER[plane]}_{index:04d}"
    image_rel = f"images/{stem}.png"
    _save_png(image, root / image_rel, rgb=True)
    entries: dict[str, list[dict]] = {"grounding": [], "closed": [], "region": []}
    base = {"image": image_rel, "plane": plane, "slice_index": index}
    liver_px = int((label >= LIVER_CLASS).sum())
    tumour_px = int((label == TUMOUR_CLASS).sum())
    for cls, pixels, minimum in (
        (LIVER_CLASS, liver_px, MIN_LIVER_PIXELS),
        (TUMOUR_CLASS, tumour_px, MIN_TUMOUR_PIXELS),
    ):
        if pixels < minimum:
            continue
        mask_rel = f"masks_merged/{stem}--{cls:04d}_merged.png"
        _save_png(((label >= cls) * 255).astype(np.uint8), root / mask_rel)
        question = rng.choice(GROUNDING_PHRASES).format(target=rng.choice(TARGET_NAMES[cls]))
        entries["grounding"].append(
            {
                "id": f"{stem}--{cls:04d}",
                **base,
                "target": REGION_ANSWERS[cls],
                "conversations": _conversation(question, f"<SEG><mask>{mask_rel}</mask>"),
            }
        )
    closed = [("plane", rng.choice(PLANE_QUESTIONS), plane)]
    for name, pixels, minimum, questions in (
        ("tumour_visible", tumour_px, MIN_TUMOUR_PIXELS, TUMOUR_QUESTIONS),
        ("liver_visible", liver_px, MIN_LIVER_PIXELS, LIVER_QUESTIONS),
    ):
        if pixels == 0 or pixels >= minimum:  # slices with a few pixels only are ambiguous: not asked
            closed.append((name, rng.choice(questions), "yes" if pixels else "no"))
    for name, question, answer in closed:
        entries["closed"].append(
            {
                "id": f"{stem}--{name}",
                **base,
                "question_kind": name,
                "answer_type": "closed",
                "conversations": _conversation(question, answer),
            }
        )
    for k, (cls, mask) in enumerate(region_masks(label, rng)):
        region_rel = f"masks/{stem}--region_{k}.png"
        _save_png((mask * 255).astype(np.uint8), root / region_rel)
        question = rng.choice(REGION_QUESTIONS).format(path=region_rel)
        entries["region"].append(
            {
                "id": f"{stem}--region_{k}",
                **base,
                "answer_type": "open",
                "conversations": _conversation(question, REGION_ANSWERS[cls]),
            }
        )
    return entries


# Release file names (spec 4.4): train/MeCoVQA-{Complex,Region,Grounding}.json, test/MeCoVQA_*_test.json.
TRAIN_FILES = {
    "closed": "MeCoVQA-Complex.json",
    "region": "MeCoVQA-Region.json",
    "grounding": "MeCoVQA-Grounding.json",
}
TEST_FILES = {
    "closed": "MeCoVQA_Complex_VQA_test.json",
    "region": "MeCoVQA_Region_VQA_test.json",
    "grounding": "MeCoVQA_Grounding_test.json",
}


def build_demo_dataset(
    out_dir: str | Path, test_fraction: float = 0.2, gap: int = 3, seed: int = 0, planes=None
) -> dict[str, object]:
    """Write the demo dataset under ``out_dir`` and return a summary (counts per split and task, the split).

    Args:
        out_dir: dataset root (gets ``images/``, ``masks/``, ``masks_merged/``, ``train/``, ``test/``).
        test_fraction: share of each plane's slices held out as one central slab.
        gap: slices excluded on each side of the held-out slab.
        seed: seed of the phrasing and region choices.
        planes: iterable of ``(plane, images, labels)``; default :func:`load_lits_planes` (the LiTS volume).
    """
    root = Path(out_dir)
    rng = random.Random(seed)
    tasks = ("grounding", "closed", "region")
    data = {split: {task: [] for task in tasks} for split in ("train", "test")}
    splits: dict[str, SlabSplit] = {}
    for plane, images, labels in planes if planes is not None else load_lits_planes():
        split = splits[plane] = slab_split(len(images), test_fraction, gap)
        for index, (image, label) in enumerate(zip(images, labels)):
            which = "test" if index in split.test else "train" if index in split.train else None
            if which is None:
                continue
            for task, items in slice_entries(plane, index, image, label, root, rng).items():
                data[which][task].extend(items)
    for split_name, files in (("train", TRAIN_FILES), ("test", TEST_FILES)):
        (root / split_name).mkdir(parents=True, exist_ok=True)
        for task, name in files.items():
            (root / split_name / name).write_text(json.dumps(data[split_name][task], indent=1) + "\n")
    mixed = [e for task in tasks for e in data["train"][task]]
    (root / "train" / "MeCoVQA_train.json").write_text(json.dumps(mixed, indent=1) + "\n")
    summary = {
        "counts": {s: {t: len(v) for t, v in data[s].items()} for s in data},
        "split": {p: {"test": [s.test[0], s.test[-1]], "gap": list(s.gap)} for p, s in splits.items()},
        "test_fraction": test_fraction,
        "gap": gap,
        "seed": seed,
    }
    (root / "split.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
