"""The MedPLIB training stages (spec 7.1) as data: what is trained, with which LoRA, losses and data.

Release recipe: I projector alignment (LLaVA code, not reproduced here), II vision-language expert, III grounding
expert, IV MoE. The demo adds a stage 0 because no pretrained CLIP / LLaMA / SAM-Med2D exist offline: stage 0 trains
the whole small model from scratch on every task (the SAM image encoder included), standing in for the pretrained
weights and stage I. Stages II-IV then follow the release recipe on that base.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .losses import LossWeights


@dataclass(frozen=True)
class StageSpec:
    """One training stage.

    Attributes:
        name: "stage0", "stage2", "stage3" or "stage4".
        tasks: dataset tasks it trains on (``grounding``, ``closed``, ``region``; release file names in
            :mod:`monai_medplib.data.demo_dataset`).
        lora_targets: LLaMA projections that get LoRA (empty: no LoRA).
        lora_r / lora_alpha / lora_dropout: LoRA hyper-parameters (release: r16/a16 in II, r8/a16 in III and IV).
        full_ft: regexes of parameter names trained in full.
        loss: loss weights.
        lr: peak learning rate (AdamW, betas 0.9/0.95, weight decay 0, linear warm-up then linear decay).
        moe: the stage trains the MoE model.
    """

    name: str
    tasks: tuple[str, ...]
    lora_targets: tuple[str, ...] = ()
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    full_ft: tuple[str, ...] = ()
    loss: LossWeights = field(default_factory=LossWeights)
    lr: float = 3e-4
    moe: bool = False


_NORMS = r"model\.layers\.\d+\.(input|post_attention)_layernorm\."

STAGE0 = StageSpec(
    name="stage0",
    tasks=("grounding", "closed", "region"),
    full_ft=(r".",),  # demo only: everything, from scratch
    loss=LossWeights(
        ce=1.0, dice=1.0, bce=2.0
    ),  # Dice doubled from the release's 0.5: small targets (tumour)
    lr=1e-3,
)
STAGE2 = StageSpec(
    name="stage2",
    tasks=("closed", "region"),
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    lora_r=16,
    lora_alpha=16,
    full_ft=(r"^lm_head\.", r"^model\.embed_tokens\.", _NORMS, r"^model\.mm_projector\."),
    loss=LossWeights(ce=1.0, dice=0.0, bce=0.0),
    lr=1e-4,
)
STAGE3 = StageSpec(
    name="stage3",
    tasks=("grounding",),
    lora_targets=("gate_proj", "up_proj", "down_proj"),
    full_ft=(r"^model\.visual_model\.mask_decoder\.", r"^model\.text_hidden_fcs\."),
    loss=LossWeights.grounding_stage(),  # release stage III: CE 1, Dice 5, BCE 1, focal 1
    lr=3e-4,
)
STAGE4 = StageSpec(
    name="stage4",
    tasks=("grounding", "closed", "region"),
    lora_targets=("gate_proj", "up_proj", "down_proj", "q_proj", "v_proj"),
    full_ft=(
        r"deepspeed_moe\.gate\.wg\.",
        r"^lm_head\.",
        r"^model\.embed_tokens\.",
        r"^model\.visual_model\.mask_decoder\.",
        r"^model\.text_hidden_fcs\.",
        r"^model\.region_fea_adapter\.",
    ),
    loss=LossWeights.release(),  # CE 1, Dice 0.5, BCE 2
    lr=3e-4,
    moe=True,
)
STAGES = {s.name: s for s in (STAGE0, STAGE2, STAGE3, STAGE4)}


def get_stage(name: str) -> StageSpec:
    """Stage by name ("stage0", "stage2", "stage3", "stage4"; "0", "2", "3", "4" work too)."""
    key = name if name.startswith("stage") else f"stage{name}"
    if key not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose one of {sorted(STAGES)}")
    return STAGES[key]
