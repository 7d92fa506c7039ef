"""MedPLIB model code: pure torch + transformers (no files, no MONAI). Sizes come from :mod:`monai_medplib.config`."""

from __future__ import annotations

from .generation import GenerationOutput
from .medplib import LLMOutput, MedPLIBForCausalLM, MedPLIBModel
from .moe import TopOneMoE
from .sam_med2d import SamMed2D
from .vision import CLIPVisionTower

__all__ = [
    "CLIPVisionTower",
    "GenerationOutput",
    "LLMOutput",
    "MedPLIBForCausalLM",
    "MedPLIBModel",
    "SamMed2D",
    "TopOneMoE",
]
