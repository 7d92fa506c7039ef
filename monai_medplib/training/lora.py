"""LoRA through peft on MedPLIB, the release's full-FT module lists, and LoRA merging.

peft's ``LoraModel`` wraps our plain ``nn.Module`` in place; after training, ``merge_and_unload`` folds the adapters
back so that the state-dict keys are the release keys again.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from peft import LoraConfig
from peft.tuners.lora import LoraModel
from torch import nn

# Module names under model.layers.* that LoRA targets (regex on the full module name). The vision tower, SAM
# and the projector are never LoRA targets in the release.
_LLM_LAYER = r"^model\.layers\.\d+\."


def lora_target_regex(projections: Sequence[str]) -> str:
    """Regex over full module names for the LLaMA projections ``projections`` (e.g. ``q_proj``, ``gate_proj``);
    it matches both dense MLPs and every MoE expert copy."""
    names = "|".join(re.escape(p) for p in projections)
    return (
        _LLM_LAYER + r"(self_attn|mlp|mlp\.deepspeed_moe\.experts\.deepspeed_experts\.\d+)\.(" + names + r")$"
    )


def add_lora(
    model: nn.Module, projections: Sequence[str], r: int, alpha: int, dropout: float = 0.05
) -> LoraModel:
    """Wrap ``model`` with LoRA adapters on ``projections``; every base parameter is frozen.

    Returns the peft ``LoraModel`` (``.model`` is the original module, now holding the adapters).
    """
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_target_regex(projections),
        bias="none",
    )
    return LoraModel(model, config, "default")


def merge_lora(wrapped: LoraModel) -> nn.Module:
    """Fold the adapters into the base weights (peft ``merge_and_unload``) and return the plain model."""
    return wrapped.merge_and_unload()


def set_trainable(
    model: nn.Module, full_ft_patterns: Sequence[str], frozen_patterns: Sequence[str] = ()
) -> list[str]:
    """Unfreeze every parameter whose name matches one of ``full_ft_patterns`` (regex ``search``) and LoRA weights,
    except those matching one of ``frozen_patterns`` (which win).

    Returns the names of the trainable parameters (sorted), for logging and tests.
    """
    compiled = [re.compile(p) for p in full_ft_patterns]
    frozen = [_frozen_pattern(p) for p in frozen_patterns]
    decisions, froze = [], set()
    for name, param in model.named_parameters():
        clean = name.replace(".base_layer", "")
        train = "lora_" in name or any(p.search(clean) for p in compiled)
        hits = {p.pattern for p in frozen if p.search(clean)} if train else set()
        froze |= hits
        decisions.append((clean, param, train and not hits))
    idle = [p.pattern for p in frozen if p.pattern not in froze]
    if idle:  # checked before any flag changes, so a refused call leaves the model as it was
        raise ValueError(f"frozen pattern(s) {idle} match no parameter this stage trains")
    for _, param, train in decisions:
        param.requires_grad_(train)
    return sorted(clean for clean, _, train in decisions if train)


def _frozen_pattern(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"frozen pattern {pattern!r} is not a regular expression: {err}") from None


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
