"""Build the demo dataset: the demo CT and MR volumes (:mod:`.demo_slices`) as MeCoVQA-style 2D data.

Every slice of both volumes becomes ``images/<stem>.png`` (8 bit, three equal channels, SA-Med2D names
``<case prefix>--<x|y|z>_<index:04d>``), each structure it shows ``masks_merged/<stem>--<class:04d>_merged.png``
and region prompts ``masks/<stem>--region_<k>.png``. Conversations, in the release JSON layout and with the
wordings of :mod:`.demo_prompts`:

* grounding (``MeCoVQA-Grounding.json``): requests for the structures the slice shows
  (``<SEG><mask>PATH</mask>``) and for structures it cannot show, answered without ``<SEG>`` by a sentence
  (CT asked for white matter, MR asked for the liver, a tumour request on a slice without tumour); in half of the
  training conversations also one demo-only naming round (``NAMING_QUESTIONS``: "<request> Which structure does
  this request name?" -> the target's name), and per training slice and copy one text-only conversation of such
  rounds (``text_only``: the model sees no image rows, so the lesson is not diluted by 576 image tokens);
* closed VQA (``MeCoVQA-Complex.json``): modality (CT / MRI), plane (axial / coronal / sagittal) and
  "is X visible" with "no" as often as "yes" (one question about a structure shown, one about one not shown);
* region VQA (``MeCoVQA-Region.json``): "what is in <region>?" -> liver / tumour / grey matter / white matter /
  background, the region a disc whose pixels are mostly one class (intersected with that class), and "is
  <region> normal?" (no only for tumour).

Training conversations hold 1 to ``max_turns`` rounds about one image (several targets of one image in one
sequence, so the ``<SEG>`` state must follow the request); ``copies`` conversations per slice and task, with
fresh random wordings, targets and regions; in multi-round builds half of them are about a random square crop of
the slice (45-80 % of its side; a real-pixel augmentation that shows structures without their neighbours). Test
files hold one round per entry (what the release evaluation
reads), each with the fields the acceptance report groups by: ``modality``, ``target``, ``question_kind``,
``wording`` ("train" or "held_out").

Targets and absent requests only name structures of the volumes in the build (a CT-only build never asks for
white matter).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from .demo_prompts import (
    CLOSED_QUESTIONS,
    GROUNDING_PHRASES,
    NAMING_QUESTIONS,
    NORMAL_QUESTIONS,
    REGION_QUESTIONS,
    TARGETS,
    absent_answer,
    modality_answer,
)
from .demo_slices import (
    DEFAULT_GAP,
    DEFAULT_TEST_FRACTION,
    DemoSlice,
    DemoVolume,
    SlabSplit,
    ct_volume_from_planes,
    demo_volumes,
    iter_slices,
    slab_split,
)

__all__ = [
    "RECIPE_DATA",
    "TEST_FILES",
    "TRAIN_FILES",
    "SlabSplit",
    "build_demo_dataset",
    "region_masks",
    "slab_split",
]

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
# The build the demo model was trained and evaluated on (scripts/train_demo.py): its held-out files, which the
# model card's figures come from, follow from these settings, so every builder of the demo data for evaluation
# (medplib eval, medplib demo-data, the bundle) uses them.
RECIPE_DATA = {"seed": 42, "copies": 6, "max_turns": 5}
REGION_RADIUS_FRACTION = 0.05  # disc radius as a share of the slice side (6 px on 128, 10 px on 192)
REGION_PURITY = 0.75  # share of the disc's bounding square that must be of the region's class
REGIONS_PER_CLASS = 2  # region prompts kept per class and slice
NORMAL_QUESTION_SHARE = 0.15  # share of region rounds that ask "is <region> normal?"
NAMING_SHARE = 0.7  # share of training grounding conversations with one naming round (see demo_prompts)
CROP_SHARE = (
    0.5  # share of training conversations about a random square crop of the slice instead of all of it
)
CROP_SIDE = (0.45, 0.8)  # crop side as a share of the slice side


def _save_png(array: np.ndarray, path: Path, rgb: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if rgb:  # SA-Med2D PNGs: 8-bit, three identical channels
        array = np.repeat(array[..., None], 3, axis=-1)
    Image.fromarray(array).save(path)


def _disc(shape: tuple[int, int], centre: tuple[int, int], radius: int) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return ((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) <= radius**2


def _grid_ok(mask: np.ndarray) -> bool:
    """The region survives the 24x24 CLIP-patch sampling (the model would see nothing otherwise)."""
    from ..processing import region_grid

    try:
        region_grid(mask)
    except ValueError:
        return False
    return True


def region_masks(
    demo_slice: DemoSlice, rng: random.Random, per_class: int = REGIONS_PER_CLASS
) -> list[tuple[str, np.ndarray]]:
    """Up to ``per_class`` region prompts per class of the slice: discs whose bounding square is at least
    :data:`REGION_PURITY` of that class, intersected with it; background discs stay near the structures."""
    label = demo_slice.label
    radius = max(3, round(REGION_RADIUS_FRACTION * max(label.shape)))
    near = ndimage.binary_dilation(label > 0, iterations=2 * radius)
    out = []
    for cls, pixels in demo_slice.region_class_map().items():
        if not pixels.any():
            continue
        purity = ndimage.uniform_filter(pixels.astype(np.float32), size=2 * radius + 1, mode="constant")
        ok = pixels & (purity >= REGION_PURITY)
        if cls == "background":
            ok &= near
        candidates = np.argwhere(ok)
        kept = 0
        for pick in rng.sample(range(len(candidates)), min(len(candidates), 8 * per_class)):
            centre = candidates[pick]
            region = _disc(label.shape, (int(centre[0]), int(centre[1])), radius) & pixels
            if _grid_ok(region):
                out.append((cls, region))
                kept += 1
                if kept == per_class:
                    break
    return out


def _random_crop(demo_slice: DemoSlice, copy: int, rng: random.Random) -> DemoSlice:
    """A random square window of the slice: crops hold a structure without another (the liver without the
    tumour, grey without white matter) far more often than whole slices, so requests for absent structures of
    the same modality are taught on real pixels."""
    height, width = demo_slice.image.shape
    size = max(16, round(rng.uniform(*CROP_SIDE) * min(height, width)))
    top, left = rng.randint(0, height - size), rng.randint(0, width - size)
    return demo_slice.crop(top, left, size, f"crop_{copy}")


def _conversation(rounds: Sequence[tuple[str, str]], image: bool = True) -> list[dict[str, str]]:
    turns = []
    for k, (question, answer) in enumerate(rounds):
        turns.append({"from": "human", "value": ("<image>\n" if k == 0 and image else "") + question})
        turns.append({"from": "gpt", "value": answer})
    return turns


def _region_question(template: str, path: str) -> str:
    return template.format(region=f"<region>{path}</region>")


class _SliceWriter:
    """Writes one slice's files and makes its conversations."""

    def __init__(
        self, demo_slice: DemoSlice, root: Path, modalities: set[str], rng: random.Random, write: bool = True
    ) -> None:
        self.s, self.root, self.rng = demo_slice, root, rng
        stem = demo_slice.stem
        self.image_rel = f"images/{stem}.png"
        save = _save_png if write else (lambda *args, **kwargs: None)
        save(demo_slice.image, root / self.image_rel, rgb=True)
        presence = demo_slice.presence
        askable = [t for t in TARGETS if TARGETS[t].modality in modalities]
        self.present = [t for t in askable if presence[t] is True]
        self.absent = [t for t in askable if presence[t] is False]
        self.mask_rel = {}
        for code, target in enumerate(demo_slice.volume.target_labels, start=1):
            if target in self.present:
                rel = f"masks_merged/{stem}--{code:04d}_merged.png"
                save((demo_slice.target_mask(target) * 255).astype(np.uint8), root / rel)
                self.mask_rel[target] = rel
        self.regions = []
        for k, (cls, mask) in enumerate(region_masks(demo_slice, rng)):
            rel = f"masks/{stem}--region_{k}.png"
            save((mask * 255).astype(np.uint8), root / rel)
            self.regions.append((cls, rel))

    def base(self, entry_id: str, **fields) -> dict:
        s = self.s
        return {
            "id": entry_id,
            "image": self.image_rel,
            "modality": s.modality,
            "plane": s.plane,
            "slice_index": s.index,
            **fields,
        }

    # ---------------------------------------------------------------------------------------- rounds
    def grounding_round(self, target: str, phrase: str | None = None) -> tuple[str, str]:
        name = self.rng.choice(TARGETS[target].names)
        question = (phrase or self.rng.choice(GROUNDING_PHRASES)).format(target=name)
        if target in self.present:
            return question, f"<SEG><mask>{self.mask_rel[target]}</mask>"
        return question, absent_answer(target)

    def naming_round(self, target: str) -> tuple[str, str]:
        request = self.rng.choice(GROUNDING_PHRASES).format(target=self.rng.choice(TARGETS[target].names))
        return f"{request} {self.rng.choice(NAMING_QUESTIONS)}", TARGETS[target].name

    def closed_round(self, kind: str, wording: str = "train", target: str | None = None) -> tuple[str, str]:
        question = self.rng.choice(CLOSED_QUESTIONS[kind][wording])
        if kind == "modality":
            return question, modality_answer(self.s.modality)
        if kind == "plane":
            return question, self.s.plane
        phrase = self.rng.choice(TARGETS[target].noun_phrases)
        return question.format(target=phrase), "yes" if target in self.present else "no"

    def region_round(self, cls: str, rel: str, normal: bool) -> tuple[str, str]:
        if normal:
            return _region_question(
                self.rng.choice(NORMAL_QUESTIONS), rel
            ), "no" if cls == "tumour" else "yes"
        return _region_question(self.rng.choice(REGION_QUESTIONS), rel), cls

    def closed_items(self) -> list[tuple[str, str | None]]:
        """Closed question slots of the slice: modality, plane, one shown and one not-shown structure. Crops get
        no plane question: a window of the slice hides the body outline that tells the plane."""
        items: list[tuple[str, str | None]] = [("modality", None)]
        if not self.s.view:
            items.append(("plane", None))
        if self.present:
            items.append(("visible", self.rng.choice(self.present)))
        if self.absent:
            items.append(("visible", self.rng.choice(self.absent)))
        return items

    def region_items(self) -> list[tuple[str, str]]:
        """Region prompts with class balance: background (found on every slice of both volumes) half as often."""
        return [(c, r) for c, r in self.regions if c != "background" or self.rng.random() < 0.5]

    # ---------------------------------------------------------------------------------------- entries
    def train_entries(self, copy: int, max_turns: int) -> dict[str, list[dict]]:
        rng, stem = self.rng, self.s.stem
        out: dict[str, list[dict]] = {"grounding": [], "closed": [], "region": []}
        targets = self.present + self.absent
        if targets:
            # a shown structure is drawn twice as often as one not shown (masks are the costlier lesson)
            weights = {t: (2.0 if t in self.present else 1.0) * rng.random() for t in targets}
            ranked = sorted(targets, key=lambda t: -weights[t])
            chosen = ranked[: rng.randint(1, max_turns)]
            rounds = [self.grounding_round(t) for t in chosen]
            if max_turns > 1 and rng.random() < NAMING_SHARE:  # only in multi-round conversations
                rounds.insert(rng.randint(0, len(rounds)), self.naming_round(rng.choice(targets)))
            out["grounding"].append(
                self.base(f"{stem}--grounding_{copy}", conversations=_conversation(rounds))
            )
        if max_turns > 1:
            # text-only naming rounds (no image rows): the cheap, undiluted version of the same reading lesson
            names = rng.sample(list(TARGETS), rng.randint(2, min(max_turns, len(TARGETS))))
            rounds = [self.naming_round(t) for t in names]
            out["grounding"].append(
                self.base(
                    f"{stem}--naming_{copy}", text_only=True, conversations=_conversation(rounds, image=False)
                )
            )
        items = self.closed_items()
        chosen_items = rng.sample(items, min(len(items), rng.randint(1, max_turns)))
        rounds = [self.closed_round(kind, "train", target) for kind, target in chosen_items]
        out["closed"].append(
            self.base(f"{stem}--closed_{copy}", answer_type="closed", conversations=_conversation(rounds))
        )
        regions = self.region_items()
        if regions:
            chosen_regions = rng.sample(regions, min(len(regions), rng.randint(1, max_turns)))
            rounds = [
                self.region_round(c, r, rng.random() < NORMAL_QUESTION_SHARE) for c, r in chosen_regions
            ]
            out["region"].append(
                self.base(f"{stem}--region_{copy}", answer_type="open", conversations=_conversation(rounds))
            )
        return out

    def test_entries(self) -> dict[str, list[dict]]:
        stem = self.s.stem
        out: dict[str, list[dict]] = {"grounding": [], "closed": [], "region": []}
        for target in self.present:
            rounds = [self.grounding_round(target)]
            key = target.replace(" ", "_")
            out["grounding"].append(
                self.base(f"{stem}--{key}", target=target, conversations=_conversation(rounds))
            )
        for kind, target in self.closed_items():
            for wording in ("train", "held_out"):
                rounds = [self.closed_round(kind, wording, target)]
                suffix = kind if target is None else f"{kind}_{target.replace(' ', '_')}"
                out["closed"].append(
                    self.base(
                        f"{stem}--{suffix}--{wording}",
                        question_kind=kind,
                        wording=wording,
                        answer_type="closed",
                        conversations=_conversation(rounds),
                        **({"target": target} if target else {}),
                    )
                )
        seen: set[str] = set()
        for k, (cls, rel) in enumerate(self.regions):
            if cls in seen:
                continue
            seen.add(cls)
            rounds = [self.region_round(cls, rel, normal=False)]
            out["region"].append(
                self.base(
                    f"{stem}--region_{k}",
                    target=cls,
                    question_kind="region",
                    answer_type="open",
                    conversations=_conversation(rounds),
                )
            )
        return out


def build_demo_dataset(
    out_dir: str | Path,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    gap: int = DEFAULT_GAP,
    seed: int = 0,
    planes: Iterable | None = None,
    *,
    volumes: Sequence[DemoVolume] | None = None,
    copies: int = 1,
    max_turns: int = 1,
    splits: Sequence[str] = ("train", "test"),
) -> dict[str, object]:
    """Write the demo dataset under ``out_dir`` and return a summary (counts per split and task, the split).

    Args:
        out_dir: dataset root (gets ``images/``, ``masks/``, ``masks_merged/``, ``train/``, ``test/``).
        test_fraction: share of each plane's slices held out as one central slab.
        gap: slices excluded on each side of the held-out slab.
        seed: seed of the wording, target and region choices.
        planes: ``(plane, images, labels)`` triples of one CT with liver / tumour labels, instead of the
            demo volumes (tests).
        volumes: the volumes (default: :func:`~.demo_slices.demo_volumes`, the LiTS CT and the MNI MR).
        copies: training conversations per slice and task.
        max_turns: rounds per training conversation are drawn from 1..``max_turns`` (test entries have one).
        splits: which splits to write (``("test",)``: the held-out files only, for evaluation).
    """
    if copies < 1 or max_turns < 1:
        raise ValueError(f"copies and max_turns must be >= 1, got {copies} and {max_turns}")
    root = Path(out_dir)
    rng = random.Random(seed)
    if volumes is None:
        volumes = [ct_volume_from_planes(planes)] if planes is not None else demo_volumes()
    modalities = {v.modality for v in volumes}
    tasks = ("grounding", "closed", "region")
    data = {split: {task: [] for task in tasks} for split in ("train", "test")}
    unknown = sorted(set(splits) - {"train", "test"})
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; use 'train' and / or 'test'")
    # One random stream draws every slice's wordings, targets and regions in volume order, so a split is drawn
    # (not written) even when it is not asked for: the held-out files of a test-only build are then exactly those
    # of the build the model was trained beside (same seed, copies and max_turns).
    for demo_slice in iter_slices(volumes, ("train", "test"), test_fraction, gap):
        write = demo_slice.split in splits
        writer = _SliceWriter(demo_slice, root, modalities, rng, write)
        if demo_slice.split == "test":
            parts = [writer.test_entries()]
        else:
            parts = []
            for copy in range(copies):
                view = writer
                if max_turns > 1 and rng.random() < CROP_SHARE:
                    view = _SliceWriter(_random_crop(demo_slice, copy, rng), root, modalities, rng, write)
                parts.append(view.train_entries(copy, max_turns))
        if not write:
            continue
        for part in parts:
            for task, items in part.items():
                data[demo_slice.split][task].extend(items)
    for split_name, files in (("train", TRAIN_FILES), ("test", TEST_FILES)):
        (root / split_name).mkdir(parents=True, exist_ok=True)
        for task, name in files.items():
            (root / split_name / name).write_text(json.dumps(data[split_name][task], indent=1) + "\n")
    mixed = [e for task in tasks for e in data["train"][task]]
    (root / "train" / "MeCoVQA_train.json").write_text(json.dumps(mixed, indent=1) + "\n")
    splits = {
        v.name: {
            p: {"test": [s.test[0], s.test[-1]], "gap": list(s.gap)}
            for p in v.plane_names()
            for s in [v.split(p, test_fraction, gap)]
        }
        for v in volumes
    }
    summary = {
        "counts": {s: {t: len(v) for t, v in data[s].items()} for s in data},
        "split": splits,
        "volumes": {v.name: v.modality for v in volumes},
        "test_fraction": test_fraction,
        "gap": gap,
        "seed": seed,
        "copies": copies,
        "max_turns": max_turns,
    }
    (root / "split.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
