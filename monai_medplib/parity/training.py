"""Parity of the training path: a fixture case's teacher-forced losses (``tf_losses``) from this implementation.

The case's LLaVA-format entry (``inputs/dataset_entries.json``) goes through the training data path
(:func:`~monai_medplib.data.mecovqa.read_mecovqa`, :class:`~monai_medplib.data.mecovqa.MeCoVQADataset`,
:func:`~monai_medplib.data.mecovqa.collate_mecovqa`) and the forward the training loop runs
(:func:`~monai_medplib.training.forward.compute_losses`) with the fixture's loss weights (``tf_loss_weights``).
Rows:

* ``training input_ids``: the dataset's ids against ``full_teacher_forced_ids``;
* ``tf_losses.<key> (training forward)``: CE and the mask BCE / Dice / focal terms ``compute_losses`` returns;
* ``tf_losses.<key>``: every stored key (total, weighted and unweighted parts, the IoU term the training forward
  leaves out) from :func:`~monai_medplib.training.losses.medplib_loss` on the logits, the [SEG] mask and the IoU
  prediction of that same forward, observed with forward hooks.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import torch

from ..data.mecovqa import MeCoVQADataset, collate_mecovqa, read_mecovqa
from ..processing import postprocess_mask_logits
from ..tokenization import MedPLIBTokenizer
from ..training.forward import compute_losses, expand_targets
from ..training.losses import LossWeights, medplib_loss
from .compare import DEFAULT_FLOAT_TOLERANCE, Row, Tolerance, compare_tensor, compare_values

# compute_losses key -> (tf_losses key, the LossWeights field that scales it there, or None: stored unweighted)
TRAINING_FORWARD_KEYS = {
    "ce": ("ce_loss", "ce"),
    "bce": ("unscale_mask_bce_loss", None),
    "dice": ("unscale_mask_dice_loss", None),
    "focal": ("unscale_mask_focal_loss", None),
}
LOSS_TOLERANCE = Tolerance(DEFAULT_FLOAT_TOLERANCE)  # fp32 losses of a full forward (CE ~8: 1e-4 absolute)


def check_training_losses(
    model: torch.nn.Module,
    tokenizer: MedPLIBTokenizer,
    inputs_dir: str | Path,
    case: str,
    entry: dict,
    template: str,
) -> list[Row]:
    """Rows comparing ``entry["tf_losses"]`` with this implementation's training forward (none without them)."""
    expected = entry.get("tf_losses")
    if not expected:
        return []
    dataset_entry = _dataset_entry(Path(inputs_dir), case)
    if dataset_entry is None:
        return [Row(case, "tf_losses", math.nan, "-", None, "no entry in inputs/dataset_entries.json")]
    stored_weights = entry.get("tf_loss_weights", {})
    unknown = sorted(set(stored_weights) - {f.name for f in fields(LossWeights)})
    if unknown:
        return [Row(case, "tf_loss_weights", math.inf, "known terms", False, f"unknown loss terms {unknown}")]
    # terms the fixture does not weigh keep the release recipe
    weights = LossWeights(**{name: float(value) for name, value in stored_weights.items()})
    with tempfile.TemporaryDirectory(prefix="medplib_parity_") as tmp:
        listing = Path(tmp) / "entries.json"
        listing.write_text(json.dumps([dataset_entry]))
        records = read_mecovqa(listing, inputs_dir, cache_dir=tmp)
        sample = MeCoVQADataset(records, tokenizer, template=template)[0]
    batch = collate_mecovqa([sample], pad_id=tokenizer.pad_id)
    rows = []
    if "full_teacher_forced_ids" in entry:
        rows.append(
            compare_values(
                case, "training input_ids", batch["input_ids"][0], entry["full_teacher_forced_ids"]
            )
        )
    with torch.no_grad(), _observe(model) as seen:
        ours = compute_losses(model, batch, tokenizer.seg_id, weights)
    for key, (reference, scale) in TRAINING_FORWARD_KEYS.items():
        if reference in expected:
            value = ours[key] * (getattr(weights, scale) if scale else 1.0)
            rows.append(
                _loss_row(case, f"tf_losses.{reference} (training forward)", value, expected[reference])
            )
    if not seen["masks"]:
        rows.append(
            Row(case, "tf_losses", math.inf, "[SEG] mask", False, "the training forward decoded no mask")
        )
        return rows
    logits = seen["logits"][0].float()
    _, labels = expand_targets(
        batch["input_ids"][0],
        batch["labels"][0],
        model.config.num_image_tokens,
        bool(batch["region_grids"][0]),
    )
    low_res, pred_iou = seen["masks"][0]  # one sample: its text-prompted decode comes first
    pred = postprocess_mask_logits(low_res.float(), batch["resizes"][0], batch["original_sizes"][0])[:, 0]
    release = medplib_loss(  # one list item per mask: the release averages the terms over masks
        logits,
        torch.tensor([labels], device=logits.device),
        pred_masks=list(pred),
        gt_masks=list(batch["masks"][0][: pred.shape[0]]),
        pred_ious=list(pred_iou.float()),
        weights=weights,
    )
    for key, value in expected.items():
        if key in release:
            rows.append(_loss_row(case, f"tf_losses.{key}", release[key], value))
        else:
            rows.append(Row(case, f"tf_losses.{key}", math.nan, "-", None, "unknown loss: not compared"))
    return rows


@contextmanager
def _observe(model: torch.nn.Module) -> Iterator[dict[str, list]]:
    """Keep the LM-head logits and the SAM mask decoder's (low-res logits, IoU) of every call inside the block."""
    seen: dict[str, list] = {"logits": [], "masks": []}
    hooks = [
        model.lm_head.register_forward_hook(lambda _m, _a, out: seen["logits"].append(out)),
        model.model.visual_model.mask_decoder.register_forward_hook(
            lambda _m, _a, out: seen["masks"].append(out)
        ),
    ]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def _dataset_entry(inputs_dir: Path, case: str) -> dict | None:
    path = inputs_dir / "dataset_entries.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("entries", {}).get(case)


def _loss_row(case: str, name: str, ours: torch.Tensor, expected: float) -> Row:
    return compare_tensor(
        case, name, ours.detach().double().reshape(()), torch.tensor(float(expected)), LOSS_TOLERANCE
    )
