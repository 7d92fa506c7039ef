"""Decoding settings of the pipeline's calls, with the release defaults in one table.

Every user call takes ``options=`` (an :class:`AnswerOptions` / :class:`GroundingOptions`) and/or the same fields
as keyword arguments; the keywords override the options. The budgets differ by call, as the release and its
evaluation use them: the official evaluation (``vqa_infer.py``) lets a 2D answer run to 1024 new tokens, while a
volume's per-slice grounding answer (``<SEG></s>`` for a trained model) and per-slice VQA need far fewer.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

# max_new_tokens per kind of call: the one table of decoding budgets.
MAX_NEW_TOKENS = {
    "image": 1024,  # 2D answer / region answer / grounding: the official evaluation's budget
    "volume_grounding": 64,  # per slice; a grounding answer is "<SEG></s>" or a short sentence
    "volume_answer": 256,  # per slice VQA / region VQA in a volume
}
SEG_RULES = ("release", "clean")

_Options = TypeVar("_Options", bound="AnswerOptions")


@dataclass(frozen=True)
class AnswerOptions:
    """How an answer is decoded.

    Attributes:
        max_new_tokens: decoding budget (see :data:`MAX_NEW_TOKENS`).
        temperature: 0 = greedy (the official evaluation); >= 1e-4 samples as the demo worker does.
        seed: random seed of sampling and of the region sampler (None: the global generators).
    """

    max_new_tokens: int = MAX_NEW_TOKENS["image"]
    temperature: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, numbers.Integral):
            raise ValueError(f"max_new_tokens must be a whole number, got {self.max_new_tokens!r}")
        object.__setattr__(self, "max_new_tokens", int(self.max_new_tokens))  # numpy integers too
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not isinstance(self.temperature, numbers.Real) or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a finite number, got {self.temperature!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)
        ):
            raise ValueError(f"seed must be a whole number or None, got {self.seed!r}")

    @classmethod
    def for_volume(cls: type[_Options]) -> _Options:
        """The per-slice defaults of volume calls."""
        return cls(max_new_tokens=MAX_NEW_TOKENS["volume_answer"])

    @classmethod
    def merge(cls: type[_Options], options: _Options | None = None, **overrides: Any) -> _Options:
        """``options`` (default: ``cls()``) with ``overrides`` applied.

        Raises:
            TypeError: an override that is not a field of ``cls`` (named, with the valid ones).
        """
        base = cls() if options is None else options
        if not isinstance(base, cls):
            raise TypeError(f"options must be a {cls.__name__}, got {type(base).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown {cls.__name__} field(s) {unknown}; valid: {sorted(known)}")
        return replace(base, **overrides) if overrides else base


@dataclass(frozen=True)
class GroundingOptions(AnswerOptions):
    """How the ``<SEG>`` state of a grounding request is obtained (release behaviour by default).

    Attributes:
        force_seg: force the answer ``<SEG></s>`` without generating (random-weight models, benchmarks).
        all_seg: decode every ``<SEG>`` of the answer (clean rule), not only the first (opt-in).
        seg_rule: ``"release"`` (exactly one ``<SEG>``: the state before the last generated token, the
            release's selection) or ``"clean"`` (the state that predicted ``<SEG>``).
        fast: one prefill where ``<SEG>`` is the first greedy token, checked per prompt (opt-in).
    """

    force_seg: bool = False
    all_seg: bool = False
    seg_rule: str = "release"
    fast: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.seg_rule not in SEG_RULES:
            raise ValueError(f"seg_rule must be one of {SEG_RULES}, got {self.seg_rule!r}")

    @classmethod
    def for_volume(cls) -> GroundingOptions:
        return cls(max_new_tokens=MAX_NEW_TOKENS["volume_grounding"])
