"""The fidelity gate of int8 (issue 17): an int8 model against the float32 one, on the demo model's held-out slices
and on the tiny public fixture (monai_medplib.evaluation.fidelity computes the figures).

Gate: the routers choose the same expert for >= 99 % of the tokens, the greedy answers to the demo's held-out
closed questions are identical, the ``<SEG>`` prompt embeddings have cosine >= 0.99 and the masks Dice >= 0.98
against the float32 masks. int4 is reported (benchmarks/RESULTS.md), not gated.
"""

from __future__ import annotations

import pytest

from monai_medplib.evaluation.acceptance import held_out_slices
from monai_medplib.evaluation.fidelity import (
    compare_pipelines,
    demo_requests,
    fixture_requests,
    middle_slices,
)
from monai_medplib.pipeline import MedPLIBPipeline


def _gate(figures: dict) -> None:
    assert figures["router_agreement"] >= 0.99, figures
    assert figures["seg_agreement"] == 1.0, figures
    assert figures["seg_both"] == figures["ground"] > 0, figures
    assert figures["seg_cosine_min"] >= 0.99, figures
    assert figures["dice_min"] >= 0.98, figures


@pytest.mark.slow
def test_int8_follows_float32_on_the_demo_models_held_out_slices():
    # the middle held-out slice of every other (volume, plane) run: CT and MR, all three planes
    slices = middle_slices(held_out_slices())[::2]
    assert {s.modality for s in slices} == {"CT", "MR"} and len({s.plane for s in slices}) == 3
    requests = demo_requests(slices, wordings=1)
    reference = MedPLIBPipeline.from_pretrained("demo", device="cpu")
    int8 = MedPLIBPipeline.from_pretrained("demo", device="cpu", quantization="int8")
    assert int8.model.quantization.kinds["int8"] > 0
    figures = compare_pipelines(reference, int8, requests)
    assert figures["vqa"] >= 15 and figures["router_tokens"] > 10_000
    assert figures["answers_same"] == 1.0, figures["answer_differences"]
    _gate(figures)


@pytest.mark.slow
def test_int8_follows_float32_on_the_tiny_public_fixture(public_fixture):
    # random weights never produce <SEG>: the answer is forced to <SEG></s>, as the fixture's oracle did; their
    # free answers are long random token strings that drift apart after a dozen tokens, so they are not gated
    requests = fixture_requests(public_fixture)
    reference = MedPLIBPipeline.from_pretrained(public_fixture / "model", device="cpu")
    int8 = MedPLIBPipeline.from_pretrained(public_fixture / "model", device="cpu", quantization="int8")
    figures = compare_pipelines(reference, int8, requests, max_new_tokens=8, force_seg=True)
    assert figures["ground"] == 2 and figures["vqa"] == 2
    _gate(figures)
