"""The model card's "what it still cannot do" follows the acceptance checks it is given."""

from __future__ import annotations

from monai_medplib.evaluation.acceptance import ACCEPTANCE
from monai_medplib.training.model_card import limits


def _acceptance(failed: set[str]) -> dict:
    return {
        "figures": {name: 0.0 if name in failed else 1.0 for name in ACCEPTANCE},
        "checks": {name: name not in failed for name in ACCEPTANCE},
        "region": {},
    }


def test_plane_limit_only_when_a_plane_check_fails() -> None:
    plane = {name for name in ACCEPTANCE if name.startswith("closed plane")}
    assert len(plane) == 2  # trained and held-out wordings
    met = limits(_acceptance(set()))
    assert "Meets every acceptance figure" in met
    assert "slice plane is guessed" not in met
    for name in plane:
        text = limits(_acceptance({name}))
        assert "slice plane is guessed" in text
        assert f"Misses these acceptance figures: {name} (0.000" in text
    other = limits(_acceptance({"closed modality, train wordings"}))
    assert "Misses these acceptance figures: closed modality, train wordings" in other
    assert "slice plane is guessed" not in other
