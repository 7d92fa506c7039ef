"""Empty masks for requests of absent structures (demo-only, off by default).

MedPLIB answers a request for a structure the image does not show without ``<SEG>``, so its state is never
decoded, and the release recipe never tells the mask decoder what such a state means. With :class:`AbsentMasks`
the state that starts the "absent" answer (the last prompt position, where a ``<SEG>`` state would be) is also
decoded and trained towards an empty mask (BCE, weighted like the stage's mask BCE): a request forced through the
decoder (``force_seg``) for an absent structure segments nothing. It also makes the decoder depend on the text
prompt from the start of training: a decoder trained from scratch otherwise learns to segment each image's dominant
structure whatever the prompt, and then gives no gradient that would make the prompts of different targets differ.

``null_prompt`` (also demo-only) adds the unconditional case: once per image that has a mask, the decoder is also
run with an all-zero text prompt (no LLM at all) towards an empty mask, so that everything it segments comes from
the prompt and none of it is a default structure of the image (the liver of a CT, the brain of an MR).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tokenization import IGNORE_INDEX

__all__ = ["AbsentMasks", "absent_state_positions", "for_tokenizer"]


@dataclass(frozen=True)
class AbsentMasks:
    """Settings: ``first_token_id`` is the first token of the absent answer (``data.demo_prompts.ABSENT_ANSWER``,
    a token no other answer starts with); ``weight`` scales the empty-mask BCE; ``null_prompt`` also trains the
    all-zero prompt towards an empty mask."""

    first_token_id: int
    weight: float = 1.0
    null_prompt: bool = False


def absent_state_positions(labels: torch.Tensor, first_token_id: int) -> torch.Tensor:
    """``[B, L-1]`` bool: positions whose state predicts the first token of an absent answer (aligned with
    ``hidden_states[:, :-1]``)."""
    return (labels[:, 1:] == first_token_id) & (labels[:, :-1] == IGNORE_INDEX)


def for_tokenizer(tokenizer, weight: float = 1.0, null_prompt: bool = False) -> AbsentMasks:
    """:class:`AbsentMasks` for ``tokenizer``: the first token of the demo data's absent answer, as it is
    tokenized after ``ASSISTANT:`` (with its leading space piece)."""
    from ..data.demo_prompts import TARGETS, absent_answer

    firsts = {tokenizer.encode(absent_answer(t), add_bos=False)[0] for t in TARGETS}
    if len(firsts) != 1:
        raise ValueError(f"the absent answers start with different tokens {sorted(firsts)}")
    return AbsentMasks(first_token_id=firsts.pop(), weight=weight, null_prompt=null_prompt)
