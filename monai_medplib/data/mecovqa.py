"""MeCoVQA reader and training dataset on the SA-Med2D-20M layout.

A MeCoVQA file is a JSON list of LLaVA-style entries::

    {"id": "ct_00--AMOS2022--amos_0001--x_0020", "image": "images/<stem>.png" (".png" may be missing),
     "conversations": [{"from": "human", "value": "<image>\\nWhat is in <region>masks/<stem>--0003_000.png</region>?"},
                       {"from": "gpt", "value": "<SEG><mask>masks_merged/<stem>--0003_merged.png</mask>"}],
     "answer_type": "open"}

Paths are relative to the ``SAMed2Dv1/`` root (``llavamed`` images one level up, as the release resolves them).
Class-level masks ``masks_merged/<stem>--<class>_merged.png`` are not shipped (the release merge script is lost):
when one is missing it is built by OR-ing the instance masks ``masks/<stem>--<class:04d>_<instance:03d>.png`` of
that class and cached on disk.

:class:`MeCoVQADataset` turns records into what one training step needs, following the release
``LazySupervisedDataset`` (region masks: largest 8-connected component of the 24x24 grid; an empty region makes
the whole sample unsupervised), and :func:`collate_mecovqa` batches them in the layout ``training/forward.py`` reads.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from monai_medplib.io.atomic import atomic_path
from monai_medplib.json_files import read_json
from monai_medplib.processing import REGION_GRID_SIZE, clip_pixels, load_rgb, region_grid, sam_pixels
from monai_medplib.tokenization import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    SEG_TOKEN,
    ConversationTemplate,
    MedPLIBTokenizer,
    build_training_example,
)

__all__ = [
    "MeCoVQADataset",
    "MeCoVQARecord",
    "Turn",
    "collate_mecovqa",
    "ensure_merged_mask",
    "invalid_region_grid",
    "load_binary_mask",
    "read_mecovqa",
    "release_sub_component",
    "resolve_image_path",
]

TaskType = Literal["vqa", "region_vqa", "grounding"]

_MASK_TAG = re.compile(r"<mask>(.*?)</mask>", re.S)
_REGION_TAG = re.compile(r"<region>(.*?)</region>", re.S)
_MERGED_NAME = re.compile(r"^(?P<stem>.+)--(?P<cls>[^-]+)_merged\.png$")
# Release: an invalid region is replaced by a 336x336 mask whose top-left 40x40 pixels are set; on the 24x24
# CLIP patch grid that is cells 0..2 (40 / 14 = 2.9). The sample is unsupervised anyway (all labels ignored).
_INVALID_REGION_CELLS = 3


@dataclass
class Turn:
    """One question/answer round with the file paths taken out of the text."""

    question: str
    answer: str | None
    region_paths: list[Path] = field(default_factory=list)
    mask_path: Path | None = None


@dataclass
class MeCoVQARecord:
    """One MeCoVQA entry with resolved paths.

    Attributes:
        id: the entry id.
        image: absolute path of the image.
        conversations: the entry's conversation, values untouched (paths still inside the tags).
        turns: the rounds, with region / mask paths resolved against the root.
        task: ``"grounding"`` if an answer holds ``<SEG>`` or a mask, else ``"region_vqa"`` if a question holds a
            region, else ``"vqa"``.
        answer_type: the entry's ``answer_type`` if it has one.
        text_only: the entry's ``text_only`` flag (demo data only): its conversation has no ``<image>`` and the
            model sees no image rows (the image file is still read for the batch tensors).
    """

    id: str
    image: Path
    conversations: list[dict[str, str]]
    turns: list[Turn]
    task: TaskType
    answer_type: str | None = None
    text_only: bool = False

    @property
    def region_paths(self) -> list[Path]:
        return [p for turn in self.turns for p in turn.region_paths]

    @property
    def mask_paths(self) -> list[Path]:
        return [turn.mask_path for turn in self.turns if turn.mask_path is not None]


# ------------------------------------------------------------------------------------------------ paths and masks


def resolve_image_path(image: str, root: str | os.PathLike) -> Path:
    """Image file of an entry: absolute as given, ``llavamed`` one level above the root, else under the root.

    A path given without ``.png`` (some release files) falls back to the same path with ``.png``.
    """
    root = Path(root)
    given = Path(image)
    if given.is_absolute():
        candidate = given
    elif "llavamed" in image:
        candidate = root.parent / image
    else:
        candidate = root / image
    if not candidate.is_file() and candidate.suffix.lower() != ".png":
        with_suffix = candidate.with_name(candidate.name + ".png")
        if with_suffix.is_file():
            return with_suffix
    if not candidate.is_file():
        raise FileNotFoundError(f"image {image!r} not found (looked for {candidate})")
    return candidate


def load_binary_mask(path: str | os.PathLike) -> np.ndarray:
    """uint8 0/1 mask from a PNG: grey value ``>= 1`` is foreground (release ``extract_masks_fun``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file not found: {path}")
    try:
        with Image.open(path) as pil:
            grey = np.array(pil.convert("L"))
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"{path}: not a readable image ({err})") from None
    return (grey >= 1).astype(np.uint8)


def ensure_merged_mask(
    relative_path: str, root: str | os.PathLike, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Path of a mask named in a conversation, building a missing ``masks_merged`` file from its instances.

    Args:
        relative_path: the path inside ``<mask>`` / ``<region>`` (relative to the root).
        root: the SA-Med2D root (``SAMed2Dv1/``).
        cache_dir: where built merged masks are written (mirroring ``relative_path``); the root when None.

    A ``masks_merged/<stem>--<class>_merged.png`` that exists neither under the root nor in the cache is the OR of
    every ``masks/<stem>--<class:04d>_<instance:03d>.png``; it is written atomically (0/255 PNG) and reused.
    """
    root = Path(root)
    direct = root / relative_path
    if direct.is_file():
        return direct
    cached = Path(cache_dir) / relative_path if cache_dir is not None else direct
    if cached.is_file():
        return cached
    match = _MERGED_NAME.match(Path(relative_path).name)
    if match is None or Path(relative_path).parent.name != "masks_merged":
        raise FileNotFoundError(f"mask file not found: {direct}")
    stem, cls = match["stem"], match["cls"]
    class_id = f"{int(cls):04d}" if cls.isdigit() else cls
    instance_dir = direct.parent.parent / "masks"
    instances = sorted(instance_dir.glob(f"{_glob_escape(stem)}--{class_id}_[0-9][0-9][0-9].png"))
    if not instances:
        raise FileNotFoundError(
            f"merged mask {relative_path!r} is missing and no instance masks "
            f"{instance_dir}/{stem}--{class_id}_NNN.png exist to build it"
        )
    merged = load_binary_mask(instances[0])
    for path in instances[1:]:
        other = load_binary_mask(path)
        if other.shape != merged.shape:
            raise ValueError(f"instance mask {path} has shape {other.shape}, expected {merged.shape}")
        merged |= other
    # Atomic write (several DataLoader workers may build the same mask at once), with the normal file mode.
    with atomic_path(cached) as tmp:
        Image.fromarray(merged * 255).save(tmp)
    return cached


def _glob_escape(text: str) -> str:
    """Escape glob metacharacters of a file-name stem."""
    return re.sub(r"([\[\]*?])", r"[\1]", text)


# ------------------------------------------------------------------------------------------------ reader


def _split_turns(conversations: Sequence[Mapping[str, Any]], entry_id: str) -> list[tuple[str, str | None]]:
    turns = list(conversations)
    if turns and turns[0].get("from") != "human":
        turns = turns[1:]  # release: a conversation opening with the assistant drops that turn
    pairs: list[tuple[str, str | None]] = []
    for j in range(0, len(turns), 2):
        human = turns[j]
        gpt = turns[j + 1] if j + 1 < len(turns) else None
        if human.get("from") != "human" or (gpt is not None and gpt.get("from") != "gpt"):
            raise ValueError(f"entry {entry_id!r}: conversation turns must alternate human / gpt (turn {j})")
        pairs.append((str(human["value"]), None if gpt is None else str(gpt["value"])))
    return pairs


def _parse_entry(
    entry: Mapping[str, Any], index: int, root: Path, cache_dir: Path | None, check_files: bool
) -> MeCoVQARecord:
    for key in ("image", "conversations"):
        if key not in entry:
            raise ValueError(f"MeCoVQA entry {index} ({entry.get('id', '?')!r}) has no {key!r} key")
    entry_id = str(entry.get("id", index))
    try:
        image = resolve_image_path(str(entry["image"]), root) if check_files else root / str(entry["image"])
    except FileNotFoundError as err:
        raise FileNotFoundError(f"entry {entry_id!r}: {err}") from None
    turns: list[Turn] = []
    pairs = _split_turns(entry["conversations"], entry_id)
    if not pairs:
        raise ValueError(f"entry {entry_id!r}: no human / gpt turns in its conversations")
    for question, answer in pairs:
        regions = [p.strip() for p in _REGION_TAG.findall(question)]
        if (
            not all(regions)
            or question.count("<region>") != question.count("</region>")
            or (question.count("<region>") != len(regions))
        ):
            raise ValueError(
                f"entry {entry_id!r}: a malformed <region>...</region> tag (a mask path between the two) in "
                f"{question[:80]!r}"
            )
        masks = _MASK_TAG.findall(answer or "")
        if len(masks) > 1:
            raise ValueError(
                f"entry {entry_id!r}: only one <mask> per answer is supported (release), got {len(masks)}"
            )
        if masks and SEG_TOKEN not in (answer or ""):
            raise ValueError(f"entry {entry_id!r}: an answer with a <mask> must contain {SEG_TOKEN}")
        if check_files:
            region_paths = [ensure_merged_mask(p, root, cache_dir) for p in regions]
            mask_path = ensure_merged_mask(masks[0].strip(), root, cache_dir) if masks else None
        else:
            region_paths = [root / p for p in regions]
            mask_path = root / masks[0].strip() if masks else None
        turns.append(Turn(question, answer, region_paths, mask_path))
    if any(t.mask_path is not None or SEG_TOKEN in (t.answer or "") for t in turns):
        task: TaskType = "grounding"
    elif any(t.region_paths for t in turns):
        task = "region_vqa"
    else:
        task = "vqa"
    return MeCoVQARecord(
        id=entry_id,
        image=image,
        conversations=[dict(turn) for turn in entry["conversations"]],
        turns=turns,
        task=task,
        answer_type=entry.get("answer_type"),
        text_only=bool(entry.get("text_only", False)),
    )


def read_mecovqa(
    json_path: str | os.PathLike,
    root: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    check_files: bool = True,
) -> list[MeCoVQARecord]:
    """Read a MeCoVQA JSON file into records with resolved paths.

    Args:
        json_path: the MeCoVQA JSON (a list of entries).
        root: the SA-Med2D root the image / mask paths are relative to.
        cache_dir: where missing ``masks_merged`` files are built (the root when None).
        check_files: resolve every file now (and build missing merged masks); False only joins paths.
    """
    json_path = Path(json_path)
    if not json_path.is_file():
        raise FileNotFoundError(f"MeCoVQA file not found: {json_path}")
    entries = read_json(json_path, list, "a JSON list of entries")
    root = Path(root)
    cache = Path(cache_dir) if cache_dir is not None else None
    return [_parse_entry(entry, i, root, cache, check_files) for i, entry in enumerate(entries)]


# ------------------------------------------------------------------------------------------------ region masks


def invalid_region_grid() -> torch.Tensor:
    """24x24 stand-in for the release's invalid-region tensor (top-left 40x40 px of 336 -> cells 0..2)."""
    grid = torch.zeros(REGION_GRID_SIZE, REGION_GRID_SIZE, dtype=torch.uint8)
    grid[:_INVALID_REGION_CELLS, :_INVALID_REGION_CELLS] = 1
    return grid


def release_sub_component(
    grid: torch.Tensor, rng: random.Random, min_ratio: float = 0.2, min_cells: int = 10
) -> torch.Tensor:
    """Release ``generate_sub_connected_component`` on a single-component 24x24 grid (optional augmentation).

    release quirk: the ratio is drawn from ``U(min_ratio, area)`` because ``max_area`` is shadowed by the
    component's area in cells, so the target usually exceeds the area and the random 8-neighbour walk covers the
    whole component. Components under ``min_cells`` cells are returned as they are.
    """
    component = grid.numpy().astype(bool)
    area = int(component.sum())
    if area < min_cells:
        return grid
    target = 0
    while target // min_cells < 1:
        target = int(area * rng.uniform(min_ratio, area))
    rows, cols = np.nonzero(component)
    stack = [rng.choice(list(zip(rows.tolist(), cols.tolist())))]
    sub = np.zeros_like(component)
    height, width = component.shape
    while stack:
        point = stack.pop()
        sub[point] = True
        if int(sub.sum()) >= target:
            break
        neighbours = [(point[0] + dy, point[1] + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        rng.shuffle(neighbours)
        for y, x in neighbours:
            if 0 <= y < height and 0 <= x < width and component[y, x] and not sub[y, x]:
                stack.append((y, x))
    return torch.from_numpy(sub.astype(np.uint8))


# ------------------------------------------------------------------------------------------------ dataset


class MeCoVQADataset(Dataset):
    """Training samples from MeCoVQA records (release ``LazySupervisedDataset`` rules).

    Each item is a dict:

    * ``input_ids`` / ``labels``: LongTensor ``[L]`` (``-200`` image, ``-300`` region; labels IGNORE_INDEX outside
      the answers and their ``</s>``), from ``tokenization.build_training_example``;
    * ``images_clip`` ``[3,336,336]``, ``images_sam`` ``[3,256,256]``, ``resize`` (SAM ``(h, w)``),
      ``original_size`` ``(H, W)``;
    * ``region_grids``: list of 24x24 uint8 grids (largest 8-connected component), ``region_valid``;
    * ``masks``: float ``[n, H, W]`` 0/1 ground truth for the ``<SEG>`` answers, ``has_seg``;
    * ``id``, ``image_path``, ``task``, ``answer_type``.

    Args:
        records: from :func:`read_mecovqa`.
        tokenizer: the MedPLIB tokenizer.
        template: conversation template (release training: ``"llava_v1"``).
        sub_component_seed: when set, apply the release's random sub-component walk to region grids with a
            per-item RNG seeded from it (off by default: it keeps the whole component in >= ~92 % of cases).
    """

    def __init__(
        self,
        records: Sequence[MeCoVQARecord],
        tokenizer: MedPLIBTokenizer,
        template: str | ConversationTemplate = "llava_v1",
        sub_component_seed: int | None = None,
    ) -> None:
        self.records = list(records)
        self.tokenizer = tokenizer
        self.template = template
        self.sub_component_seed = sub_component_seed

    def __len__(self) -> int:
        return len(self.records)

    def _region_grids(
        self, record: MeCoVQARecord, index: int, shape: tuple[int, int]
    ) -> tuple[list[torch.Tensor], bool]:
        grids: list[torch.Tensor] = []
        valid = True
        rng = random.Random(self.sub_component_seed + index) if self.sub_component_seed is not None else None
        for path in record.region_paths:
            mask = load_binary_mask(path)
            if mask.shape != shape:
                raise ValueError(f"entry {record.id!r}: region mask {path} is {mask.shape}, image is {shape}")
            try:
                grid = region_grid(mask, keep_largest_component=True)
            except ValueError:
                # Empty region (or one that misses every patch's sampled pixel): release marks it invalid.
                grids.append(invalid_region_grid())
                valid = False
                continue
            if rng is not None:
                grid = release_sub_component(grid, rng)
            grids.append(grid)
            valid = True  # release quirk: validity is the last region's
        return grids, valid

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        conversations = [dict(turn) for turn in record.conversations]
        if not record.text_only and not any(
            IMAGE_PLACEHOLDER in str(t.get("value", "")) for t in conversations
        ):
            raise ValueError(f"entry {record.id!r}: the first human turn must contain {IMAGE_PLACEHOLDER}")
        ids, labels = build_training_example(conversations, self.tokenizer, self.template)
        try:
            rgb = load_rgb(record.image)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise ValueError(f"entry {record.id!r}: {record.image} is not a readable image ({err})") from None
        height, width = rgb.shape[:2]
        try:
            grids, region_valid = self._region_grids(record, index, (height, width))
        except ValueError as err:
            if str(err).startswith("entry "):
                raise
            raise ValueError(f"entry {record.id!r}: {err}") from None
        if grids and not region_valid:
            labels = [IGNORE_INDEX] * len(labels)  # release: an invalid region makes the sample unsupervised
        images_sam, resize = sam_pixels(rgb)
        masks = []
        for path in record.mask_paths:
            try:
                mask = load_binary_mask(path)
            except ValueError as err:
                raise ValueError(f"entry {record.id!r}: {err}") from None
            if mask.shape != (height, width):
                raise ValueError(
                    f"entry {record.id!r}: mask {path} is {mask.shape}, image is {(height, width)}"
                )
            masks.append(torch.from_numpy(mask.astype(np.float32)))
        return {
            "id": record.id,
            "image_path": str(record.image),
            "task": record.task,
            "answer_type": record.answer_type,
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "images_clip": clip_pixels(rgb),
            "images_sam": images_sam,
            "resize": tuple(resize),
            "original_size": (height, width),
            "region_grids": grids,
            "region_valid": region_valid,
            "masks": torch.stack(masks) if masks else torch.zeros(0, height, width),
            "has_seg": bool(masks),
        }


def collate_mecovqa(
    samples: Sequence[Mapping[str, Any]], pad_id: int = 0, max_length: int | None = None
) -> dict[str, Any]:
    """Batch dataset items for ``training/forward.py`` (lists) plus right-padded tensors.

    Returns:
        ``input_ids`` / ``labels`` (lists of int lists, truncated to ``max_length`` like the release collator),
        ``input_ids_padded`` / ``labels_padded`` ``[B, L]`` (right padding with ``pad_id`` / IGNORE_INDEX),
        ``attention_mask`` ``[B, L]`` bool, ``images_clip`` ``[B,3,336,336]``, ``images_sam`` ``[B,3,256,256]``,
        ``region_grids`` (per sample lists), ``region_valid``, ``masks`` (per sample ``[n,H,W]``), ``has_seg``,
        ``resizes``, ``original_sizes``, ``ids``, ``image_paths``, ``tasks``, ``answer_types``.
    """
    if not samples:
        raise ValueError("collate_mecovqa needs at least one sample")
    ids = [s["input_ids"].tolist()[:max_length] for s in samples]
    labels = [s["labels"].tolist()[:max_length] for s in samples]
    length = max(len(row) for row in ids)
    ids_padded = torch.full((len(ids), length), pad_id, dtype=torch.long)
    labels_padded = torch.full((len(ids), length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(ids), length), dtype=torch.bool)
    for row, (row_ids, row_labels) in enumerate(zip(ids, labels)):
        ids_padded[row, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
        labels_padded[row, : len(row_labels)] = torch.tensor(row_labels, dtype=torch.long)
        attention[row, : len(row_ids)] = True
    return {
        "input_ids": ids,
        "labels": labels,
        "input_ids_padded": ids_padded,
        "labels_padded": labels_padded,
        "attention_mask": attention,
        "images_clip": torch.stack([s["images_clip"] for s in samples]),
        "images_sam": torch.stack([s["images_sam"] for s in samples]),
        "region_grids": [list(s["region_grids"]) for s in samples],
        "region_valid": [bool(s["region_valid"]) for s in samples],
        "masks": [s["masks"] for s in samples],
        "has_seg": [bool(s["has_seg"]) for s in samples],
        "resizes": [tuple(s["resize"]) for s in samples],
        "original_sizes": [tuple(s["original_size"]) for s in samples],
        "ids": [s["id"] for s in samples],
        "image_paths": [s["image_path"] for s in samples],
        "tasks": [s["task"] for s in samples],
        "answer_types": [s["answer_type"] for s in samples],
    }
