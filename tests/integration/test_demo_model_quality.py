"""The committed demo model does what its card claims, on held-out slices it never trained on (issue 13).

A small but spread sample: a few slices of every plane's held-out slab of both volumes (LiTS CT, MNI MR). The
expectations are the real labels of those slices and the acceptance thresholds of issue 13; the Dice and the
balanced accuracies are computed here, independently of ``monai_medplib.evaluation``. The controls check that the
text matters: the "liver" and "tumour" masks differ, and a zero ``<SEG>`` prompt (no LLM at all) segments nothing.
Where the model falls short of the issue (the plane question, white matter: ``tests/support/demo_floor.py``) the
tests assert what it does and say so;
the model card lists the misses.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from monai_medplib import MedPLIBPipeline
from monai_medplib.data.demo_dataset import region_masks
from monai_medplib.data.demo_prompts import CLOSED_QUESTIONS, DOC_QUESTIONS, TARGETS
from monai_medplib.data.demo_slices import demo_volumes, iter_slices
from tests.support.demo_floor import MIN_MDICE

pytestmark = pytest.mark.slow

# issue 13 acceptance


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def balanced(rows: list[tuple[str, bool]]) -> float:
    per: dict[str, list[bool]] = {}
    for answer, ok in rows:
        per.setdefault(answer, []).append(ok)
    return float(np.mean([np.mean(v) for v in per.values()]))


def norm(text: str) -> str:
    return text.strip().rstrip(".").lower()


@pytest.fixture(scope="module")
def pipe() -> MedPLIBPipeline:
    torch.set_num_threads(2)
    return MedPLIBPipeline.from_pretrained("demo", device="cpu")


@pytest.fixture(scope="module")
def slices():
    # 2 CT + 3 MR slices per plane, spread over each held-out slab
    ct, mr = demo_volumes()
    return list(iter_slices([ct], ("test",), every=13)) + list(iter_slices([mr], ("test",), every=13))


@pytest.fixture(scope="module")
def groundings(pipe, slices):
    requests = [(s, t) for s in slices for t, shown in s.presence.items() if shown is not None]
    results = pipe.ground_batch(
        [s.image for s, _ in requests], [f"Please segment the {t}." for _, t in requests], max_new_tokens=32
    )
    return [(s, t, s.presence[t], r) for (s, t), r in zip(requests, results)]


def test_grounding_follows_the_text_on_held_out_slices(groundings):
    per_target: dict[str, list[float]] = {}
    for s, target, shown, result in groundings:
        if shown:
            score = dice(result.mask, s.target_mask(target)) if result.has_seg else 0.0
            per_target.setdefault(target, []).append(score)
    assert set(per_target) == set(MIN_MDICE)
    for target, scores in per_target.items():
        assert np.mean(scores) >= MIN_MDICE[target], (target, scores)


def test_absent_structures_get_no_seg_and_present_ones_do(groundings):
    absent = [r for _, _, shown, r in groundings if not shown]
    present = [r for _, _, shown, r in groundings if shown]
    assert len(absent) >= 30 and len(present) >= 30
    assert np.mean([not r.has_seg and not r.mask.any() for r in absent]) >= 0.95
    assert np.mean([r.has_seg for r in present]) >= 0.90
    # absent answers say so in a sentence
    assert all("no " in r.answer.lower() for r in absent if not r.has_seg)


def test_text_controls_liver_vs_tumour_and_zero_prompt(pipe, groundings):
    by_slice: dict[int, dict[str, object]] = {}
    for s, target, shown, result in groundings:
        if shown and target in ("liver", "tumour"):
            by_slice.setdefault(id(s), {})[target] = result
    pairs = [p for p in by_slice.values() if len(p) == 2]
    assert len(pairs) >= 4
    assert np.mean([dice(p["liver"].mask, p["tumour"].mask) for p in pairs]) <= 0.5
    # the same decoder with the <SEG> prompt embedding replaced by zeros
    shown = [(s, t, r) for s, t, present, r in groundings if present and r.has_seg]
    features = pipe.encode_images([s.image for s, _, _ in shown], with_sam=True)
    low_res, _ = pipe.decode_text_prompts(
        features, torch.zeros(len(shown), shown[0][2].seg_embedding.shape[-1])
    )
    zero_masks = [torch.sigmoid(x).numpy() > 0.1 for x in pipe.postprocess_batch(low_res, features)]
    normal, zeroed = {}, {}
    for (s, t, r), z in zip(shown, zero_masks):
        normal.setdefault(t, []).append(dice(r.mask, s.target_mask(t)))
        zeroed.setdefault(t, []).append(dice(z, s.target_mask(t)))
    drops = {t: float(np.mean(normal[t]) - np.mean(zeroed[t])) for t in normal}
    print("zero-prompt Dice drop per target", drops)
    # the goal: the mean over the targets drops by >= 0.3; the decoder has no default structure (trained
    # with --null-prompt), so every target drops, the large ones (liver, brain) included
    assert np.mean(list(drops.values())) >= 0.3 and min(drops.values()) >= 0.3, drops
    assert np.mean([z.mean() for z in zero_masks]) < 0.01  # the zero prompt segments (almost) nothing


def test_region_vqa_names_the_tissue_under_the_region(pipe, slices):
    rng = random.Random(0)
    items = [(s, cls, mask) for s in slices for cls, mask in region_masks(s, rng, per_class=1)]
    assert {cls for _, cls, _ in items} == {"liver", "tumour", "grey matter", "white matter", "background"}
    answers = pipe.answer_region_batch(
        [s.image for s, _, _ in items], ["What is inside this region?"] * len(items), [m for _, _, m in items]
    )
    rows = [(cls, norm(a) == cls) for (_, cls, _), a in zip(items, answers)]
    # the goal (chance 0.20; a model reading the image but not the region, "liver" on every CT region and
    # one tissue name on every MR region, would score 0.40); the tumour is what the tissue-contrast step is for
    assert balanced(rows) >= 0.80, rows
    assert np.mean([ok for cls, ok in rows if cls == "tumour"]) >= 0.8, rows


def test_closed_vqa_modality_and_visible_on_held_out_wordings(pipe, slices):
    """The modality and "is X visible" on wordings no training conversation used, with "no" as often as "yes". Not
    asserted, because the model does not do it (model card, issue 13 left open): the plane, on any wording (chance)."""
    items = []
    for n, s in enumerate(slices):
        modality = "ct" if s.modality == "CT" else "mri"
        items.append(("modality", CLOSED_QUESTIONS["modality"]["held_out"][n % 2], s, modality))
        shown = [t for t, p in s.presence.items() if p]
        hidden = [t for t, p in s.presence.items() if p is False]
        for targets, answer in ((shown, "yes"), (hidden, "no")):
            phrase = TARGETS[targets[n % len(targets)]].noun_phrases[0]
            wording = CLOSED_QUESTIONS["visible"]["held_out"][n % 2]
            items.append(("visible", wording.format(target=phrase), s, answer))
    answers = pipe.answer_batch(
        [s.image for _, _, s, _ in items], [q for _, q, _, _ in items], max_new_tokens=16
    )
    for kind in ("modality", "visible"):
        rows = [(a, norm(p) == a) for (k, _, _, a), p in zip(items, answers) if k == kind]
        assert balanced(rows) >= 0.90, (
            kind,
            [(q, a, p) for (k, q, _, a), p in zip(items, answers) if k == kind],
        )


def test_the_docs_example_questions_on_modality_and_visibility(pipe, slices):
    # the docs' plane questions are answered at chance (model card: "What it still cannot do")
    middle = [slices[len(slices) // 4], slices[3 * len(slices) // 4]]  # one CT, one MR slice
    for s in middle:
        expected = {q: ("ct" if s.modality == "CT" else "mri") for q in DOC_QUESTIONS["modality"]}
        expected.update({q: "yes" if s.presence[t] else "no" for q, t in DOC_QUESTIONS["visible"]})
        answers = pipe.answer_batch([s.image] * len(expected), list(expected), max_new_tokens=16)
        assert [norm(a) for a in answers] == list(expected.values()), (s.stem, answers)


def test_a_click_on_the_largest_error_improves_the_mask(pipe, groundings):
    from scipy import ndimage

    gains = []
    for s, target, shown, result in groundings:
        if not shown:
            continue
        truth = s.target_mask(target)
        missed, extra = truth & ~result.mask, result.mask & ~truth
        blob = missed if missed.sum() >= extra.sum() else extra
        labels, count = ndimage.label(blob)
        if not count:
            continue
        largest = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
        row, col = np.unravel_index(np.argmax(ndimage.distance_transform_edt(largest)), largest.shape)
        refined = pipe.refine(s.image, [(float(col), float(row))], [int(blob is missed)], prior=result)
        gains.append(dice(refined.mask, truth) - dice(result.mask, truth))
    assert len(gains) >= 10 and np.mean(gains) > 0, gains
