"""Stage-IV initialisation of the MoE model from the two merged experts (release ``initialize_moe_modules``).

For every decoder layer: expert 0's ``gate/up/down_proj`` <- the grounding (stage-III) model's MLP, expert 1's <- the
vision-language (stage-II) model's MLP, router ``wg`` freshly initialised (PyTorch default for Linear: uniform
+-1/sqrt(hidden)). ``text_hidden_fcs`` and ``mask_decoder`` come from stage III, ``region_fea_adapter`` and
everything else (attention, norms, embeddings, lm_head, CLIP, projector, SAM encoders) from stage II.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from ..config import MedPLIBConfig
from ..modeling.medplib import MedPLIBForCausalLM

_FROM_GROUNDING = ("model.text_hidden_fcs.", "model.visual_model.mask_decoder.")
_MLP = ("gate_proj", "up_proj", "down_proj")


def moe_config(dense: MedPLIBConfig, num_experts: int = 2) -> MedPLIBConfig:
    """The stage-IV config: the dense config with every layer a top-1 MoE of ``num_experts`` experts."""
    return dataclasses.replace(
        copy.deepcopy(dense),
        moe_enable=True,
        moe_layers_idx=list(range(dense.num_hidden_layers)),
        num_experts=num_experts,
    )


@torch.no_grad()
def assemble_moe(
    vision_language: MedPLIBForCausalLM, grounding: MedPLIBForCausalLM, seed: int | None = None
) -> MedPLIBForCausalLM:
    """Build the stage-IV MoE model from the merged (LoRA-free, dense) stage-II and stage-III models.

    Args:
        vision_language: merged stage-II model (expert 1, and the default source of all shared weights).
        grounding: merged stage-III model (expert 0, ``text_hidden_fcs``, ``mask_decoder``).
        seed: seed of the fresh router initialisation.

    Raises:
        ValueError: when the two models differ in architecture or already are MoE models.
    """
    for name, m in (("vision_language", vision_language), ("grounding", grounding)):
        if m.config.moe_enable:
            raise ValueError(f"{name} model must be dense (moe_enable=False) before the MoE assembly")
    vl_state, gr_state = vision_language.state_dict(), grounding.state_dict()
    if set(vl_state) != set(gr_state):
        raise ValueError("stage-II and stage-III models have different parameter sets")
    if seed is not None:
        torch.manual_seed(seed)
    model = MedPLIBForCausalLM(moe_config(vision_language.config)).to(vision_language.dtype)
    state = model.state_dict()
    for key in state:
        if ".deepspeed_moe." in key:
            continue
        source = gr_state if key.startswith(_FROM_GROUNDING) else vl_state
        state[key] = source[key]
    for i in range(model.config.num_hidden_layers):
        for e, source in enumerate((gr_state, vl_state)):
            for proj in _MLP:
                state[f"model.layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.{proj}.weight"] = (
                    source[f"model.layers.{i}.mlp.{proj}.weight"]
                )
        # release: the router is a fresh nn.Linear (kept from the constructor above), fp32 like DeepSpeed's wg
    model.load_state_dict(state, strict=True)
    for moe in model.model.moe_layers():
        moe.deepspeed_moe.gate.wg.float()
    return model
