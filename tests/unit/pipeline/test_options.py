"""Decoding options (monai_medplib/pipeline/options.py): what a call may pass and what it is refused."""

from __future__ import annotations

import numpy as np
import pytest

from monai_medplib.pipeline.options import AnswerOptions, GroundingOptions


def test_decoding_options_are_checked_and_numpy_integers_work():
    assert AnswerOptions(max_new_tokens=np.int64(2)).max_new_tokens == 2
    assert type(GroundingOptions.merge(max_new_tokens=np.int32(5)).max_new_tokens) is int
    for bad in (float("nan"), float("inf"), "0.5"):
        with pytest.raises(ValueError, match="temperature must be a finite number"):
            AnswerOptions(temperature=bad)
    with pytest.raises(ValueError, match="whole number"):
        AnswerOptions(max_new_tokens=2.5)
    with pytest.raises(ValueError, match="whole number"):
        AnswerOptions(max_new_tokens=True)
