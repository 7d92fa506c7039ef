"""The bundle README's performance table is the demo model card's (the card is written by the training script from
the model's own evaluation; a copy kept by hand went stale after two retrainings)."""

from __future__ import annotations

from tests.support.paths import REPO

HEADER = "| task | metric | held-out score (%) | n |"


def _table(text: str) -> list[str]:
    start = text.index(HEADER)
    rows = []
    for line in text[start:].splitlines():
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def test_bundle_performance_table_is_the_model_card_s():
    card = (REPO / "monai_medplib" / "demo_model" / "MODEL_CARD.md").read_text()
    bundle = (REPO / "bundle" / "docs" / "README.md").read_text()
    assert len(_table(card)) > 5
    assert _table(bundle) == _table(card)
