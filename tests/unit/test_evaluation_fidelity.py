"""The router agreement of the fidelity figures (issue 17): which top-1 choices of two models are compared."""

from __future__ import annotations

import torch

from monai_medplib.evaluation.fidelity import _agreement


def test_router_agreement_compares_the_rows_both_models_ran():
    # two MoE layers; the reference ran the whole 5-row prompt, the candidate only the last 2 rows on its cached
    # image prefix; then one decoding step each
    ref = [torch.tensor([0, 1, 1, 0, 1]), torch.tensor([1, 1, 0, 0, 0]), torch.tensor([1]), torch.tensor([0])]
    cand = [torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([1])]
    # same tokens: the prompt's last two rows of both layers and both steps -> 1 + 1 + 1 + 0 of 6
    assert _agreement(ref, cand, same_tokens=True) == (3, 6)
    # different tokens: the steps route different tokens and are left out -> 1 + 1 of 4
    assert _agreement(ref, cand, same_tokens=False) == (2, 4)
    # both ran the whole prompt: every row counts
    assert _agreement(ref[:2], ref[:2], same_tokens=False) == (10, 10)
