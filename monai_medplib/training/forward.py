"""The training forward of MedPLIB (release ``model_forward(inference=False)``): token CE plus mask losses.

Batch layout (what :func:`monai_medplib.data.mecovqa` collates; only these keys are read):

* ``input_ids`` / ``labels``: per sample lists of ids (with ``-200`` for the image, ``-300`` between
  ``<region></region>``) and labels (``-100`` outside the assistant answers);
* ``images_clip`` ``[B,3,336,336]`` and ``images_sam`` ``[B,3,256,256]`` (SAM may be absent when no sample
  of the batch has a ``<SEG>``);
* ``region_grids``: per sample a list of 24x24 grids (empty list: none);
* ``masks``: per sample a ``[n,H,W]`` float tensor of ground-truth masks for its ``<SEG>`` tokens (n may be 0);
* ``resizes``: per sample the SAM ``(h, w)`` after ResizeLongestSide(256); ``original_sizes``: ``(H, W)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..modeling.medplib import IMAGE_TOKEN_INDEX, REGION_TOKEN_INDEX, MedPLIBForCausalLM
from ..processing import postprocess_mask_logits
from ..tokenization import IGNORE_INDEX
from .absent_masks import AbsentMasks, absent_state_positions
from .click_prompts import ClickTraining, click_chain_losses
from .losses import LossWeights, focal_loss, mask_bce_loss, mask_dice_loss, token_ce_loss


def expand_targets(
    ids: Sequence[int], labels: Sequence[int], num_image_rows: int, with_regions: bool
) -> tuple[list[int], list[int]]:
    """Token ids and labels on the expanded embedding sequence that ``build_inputs_embeds`` produces.

    ``-200`` becomes ``num_image_rows`` ignored rows; ``-300`` becomes one ignored row when region features are
    inserted and disappears otherwise (release behaviour without region masks).
    """
    out_ids: list[int] = []
    out_labels: list[int] = []
    for tok, lab in zip(ids, labels):
        if tok == IMAGE_TOKEN_INDEX:
            out_ids += [IMAGE_TOKEN_INDEX] * num_image_rows
            out_labels += [IGNORE_INDEX] * num_image_rows
        elif tok == REGION_TOKEN_INDEX:
            if with_regions:
                out_ids.append(REGION_TOKEN_INDEX)
                out_labels.append(IGNORE_INDEX)
        else:
            out_ids.append(tok)
            out_labels.append(lab)
    return out_ids, out_labels


def _pad(rows: list[list[int]], length: int, value: int) -> torch.Tensor:
    return torch.tensor([r + [value] * (length - len(r)) for r in rows], dtype=torch.long)


def _clip_features(
    model: MedPLIBForCausalLM, images: torch.Tensor, ids: Sequence[Sequence[int]]
) -> torch.Tensor:
    """CLIP features of the batch; rows without an image placeholder (demo text-only rounds) skip the encoder and
    get zeros, which ``build_inputs_embeds`` never reads."""
    with_image = [b for b, row in enumerate(ids) if IMAGE_TOKEN_INDEX in row]
    if len(with_image) == len(ids):
        return model.clip_features(images)
    if not with_image:
        return images.new_zeros(len(ids), 1, model.config.mm_hidden_size)
    feats = model.clip_features(images[with_image])
    out = feats.new_zeros(len(ids), *feats.shape[1:])
    out[with_image] = feats
    return out


def compute_losses(
    model: MedPLIBForCausalLM,
    batch: Mapping[str, object],
    seg_token_id: int,
    weights: LossWeights,
    clicks: ClickTraining | None = None,
    absent: AbsentMasks | None = None,
) -> dict[str, torch.Tensor]:
    """Losses of one batch: ``{"loss", "ce", "bce", "dice", "focal", "num_masks"}`` (+ ``"click"``).

    CE is the mean over every supervised token of the batch (release: shifted CE of the HF causal LM).
    The [SEG] state is the final-norm hidden state at the position *before* each ``<SEG>`` target token (release
    ``seg_token_mask = input_ids[:, 1:] == SEG`` shifted by the image rows), fed through ``text_hidden_fcs`` and the
    SAM decoder with only the text prompt; logits are brought to the original size with the release crop quirk,
    then BCE (mean over pixels) and soft Dice are averaged over masks.

    ``clicks`` (demo-only, None in the release recipe) adds SAM-Med2D-style point / box prompt chains per mask
    (:mod:`.click_prompts`); their BCE / Dice, weighted like the text masks', enter the total as
    ``clicks.weight * click``. ``absent`` (demo-only) decodes the states that start an absent-structure answer
    towards an empty mask (:mod:`.absent_masks`; with ``absent.null_prompt`` also an all-zero prompt per image with a
    mask), adding ``absent.weight * weights.bce * absent``.
    """
    ids: list[list[int]] = batch["input_ids"]  # type: ignore[assignment]
    grids: list[list[torch.Tensor]] = batch.get("region_grids") or [[] for _ in ids]  # type: ignore[assignment]
    device = model.device
    clip_feats = _clip_features(model, batch["images_clip"].to(device, model.dtype), ids)  # type: ignore[union-attr]
    embeds, attention = model.build_inputs_embeds(ids, clip_feats, grids, padding_side="right")
    expanded = [
        expand_targets(i, lab, clip_feats.shape[1], bool(g))
        for i, lab, g in zip(ids, batch["labels"], grids)  # type: ignore[arg-type]
    ]
    length = embeds.shape[1]
    exp_ids = _pad([e[0] for e in expanded], length, IGNORE_INDEX).to(device)
    exp_labels = _pad([e[1] for e in expanded], length, IGNORE_INDEX).to(device)
    out = model.llm_forward(embeds, attention)
    ce = token_ce_loss(out.logits, exp_labels)
    zero = ce.new_zeros(())
    losses = {"ce": ce, "bce": zero, "dice": zero, "focal": zero, "num_masks": zero}
    if clicks is not None:
        losses["click"] = zero
    if absent is not None:
        losses["absent"] = zero
    # position p predicts token p+1: the [SEG] state sits just before each <SEG> target
    seg_positions = (exp_ids[:, 1:] == seg_token_id) & (exp_labels[:, 1:] == seg_token_id)
    absent_positions = (
        absent_state_positions(exp_labels, absent.first_token_id) if absent is not None else None
    )
    masks: list[torch.Tensor] = batch.get("masks") or []  # type: ignore[assignment]
    if seg_positions.any() or (absent_positions is not None and absent_positions.any()):
        losses.update(
            _mask_losses(
                model,
                batch,
                out.hidden_states[:, :-1],
                seg_positions,
                masks,
                weights,
                clicks,
                absent_positions,
                absent is not None and absent.null_prompt,
            )
        )
    total = (
        weights.ce * losses["ce"]
        + weights.bce * losses["bce"]
        + weights.dice * losses["dice"]
        + weights.focal * losses["focal"]
    )
    if clicks is not None:
        total = total + clicks.weight * losses["click"]
    if absent is not None:
        total = total + absent.weight * weights.bce * losses["absent"]
    losses["loss"] = total
    return losses


def _empty_mask_bce(model, image_embedding, prompts, batch, b) -> torch.Tensor:
    """Summed BCE of decoding ``prompts [P,1,C]`` on one image towards an empty mask (P prompts)."""
    low, _ = model.model.visual_model.decode(
        image_embedding.expand(prompts.shape[0], -1, -1, -1), text_embeds=prompts
    )
    logits = postprocess_mask_logits(low.float(), batch["resizes"][b], batch["original_sizes"][b])[:, 0]
    return mask_bce_loss(logits, torch.zeros_like(logits)) * prompts.shape[0]


def _mask_losses(
    model, batch, hidden, seg_positions, masks, weights, clicks, absent_positions=None, null_prompt=False
) -> dict[str, torch.Tensor]:
    device = model.device
    wanted = seg_positions if absent_positions is None else seg_positions | absent_positions
    rows = [b for b in range(seg_positions.shape[0]) if wanted[b].any()]
    images_sam = batch["images_sam"][rows].to(device, model.dtype)
    image_embeddings = model.model.visual_model.encode_image(images_sam)
    bce = dice = focal = click_bce = click_dice = absent_bce = hidden.new_zeros((), dtype=torch.float32)
    count = click_steps = absent_count = 0
    for k, b in enumerate(rows):
        if absent_positions is not None and absent_positions[b].any():
            states = hidden[b][absent_positions[b]]
            said_absent = model.seg_embeddings(states)[:, None]
            absent_bce = absent_bce + _empty_mask_bce(
                model, image_embeddings[k : k + 1], said_absent, batch, b
            )
            absent_count += states.shape[0]
        seg_hidden = hidden[b][seg_positions[b]]
        gt = masks[b].to(device, torch.float32)
        n = min(seg_hidden.shape[0], gt.shape[0])  # release: one mask per [SEG], extra ones ignored
        if n == 0:
            continue
        prompts = model.seg_embeddings(seg_hidden[:n])
        low_res, _ = model.model.visual_model.decode(
            image_embeddings[k : k + 1].expand(n, -1, -1, -1), text_embeds=prompts[:, None]
        )
        pred = postprocess_mask_logits(low_res.float(), batch["resizes"][b], batch["original_sizes"][b])[:, 0]
        bce = bce + mask_bce_loss(pred, gt[:n]) * n
        dice = dice + mask_dice_loss(pred, gt[:n]) * n
        focal = focal + focal_loss(pred, gt[:n]) * n
        count += n
        if null_prompt:  # the unconditional decode: an all-zero prompt segments nothing
            zero = torch.zeros_like(prompts[:1, None])
            absent_bce = absent_bce + _empty_mask_bce(model, image_embeddings[k : k + 1], zero, batch, b)
            absent_count += 1
        if clicks is not None:
            chain_bce, chain_dice, steps = click_chain_losses(
                model.model.visual_model,
                image_embeddings[k : k + 1],
                prompts,
                low_res,
                gt[:n],
                batch["resizes"][b],
                batch["original_sizes"][b],
                clicks,
            )
            click_bce, click_dice, click_steps = (
                click_bce + chain_bce,
                click_dice + chain_dice,
                click_steps + steps,
            )
    out = {}
    if absent_count:
        out["absent"] = absent_bce / absent_count
    if count == 0:
        return out
    out.update(
        bce=bce / count, dice=dice / count, focal=focal / count, num_masks=bce.new_tensor(float(count))
    )
    if click_steps:
        out["click"] = (weights.bce * click_bce + weights.dice * click_dice) / click_steps
    return out
