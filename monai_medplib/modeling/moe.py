"""Deepspeed-free top-1 mixture-of-experts MLP with the release (DeepSpeed 0.13.1) parameter names (spec 2.6).

Child names reproduce ``deepspeed.moe.layer.MoE`` so that release keys load unchanged:
``deepspeed_moe.gate.wg.weight`` and ``deepspeed_moe.experts.deepspeed_experts.{e}.{gate,up,down}_proj.weight``.
At inference (``eval_capacity_factor >= num_experts``) DeepSpeed drops no token, so the layer reduces to
``y = p_top1(x) * Expert_top1(x)`` with the router in fp32; no process group is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ExpertMLP(nn.Module):
    """LLaMA SwiGLU MLP: ``down(silu(gate(x)) * up(x))``, no bias."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TopOneGate(nn.Module):
    """Router ``wg`` (Linear H->E, no bias). DeepSpeed keeps it fp32 and computes the logits in fp32."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.wg = nn.Linear(hidden_size, num_experts, bias=False, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.wg.weight.float())


class _Experts(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int):
        super().__init__()
        self.deepspeed_experts = nn.ModuleList(
            [ExpertMLP(hidden_size, intermediate_size) for _ in range(num_experts)]
        )


class _DeepSpeedMoE(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int):
        super().__init__()
        self.gate = TopOneGate(hidden_size, num_experts)
        self.experts = _Experts(hidden_size, intermediate_size, num_experts)


class TopOneMoE(nn.Module):
    """Drop-in replacement for a LLaMA decoder MLP: returns a tensor of the input shape.

    ``last_router_logits`` holds the fp32 router logits ``[B,S,E]`` of the latest call (for tests and the
    optional auxiliary loss); ``record_router_logits = False`` turns that off.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int = 2):
        super().__init__()
        self.deepspeed_moe = _DeepSpeedMoE(hidden_size, intermediate_size, num_experts)
        self.record_router_logits = True
        self.last_router_logits: torch.Tensor | None = None

    @property
    def experts(self) -> nn.ModuleList:
        return self.deepspeed_moe.experts.deepspeed_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits = self.deepspeed_moe.gate(flat)
        if self.record_router_logits:
            self.last_router_logits = logits.view(*shape[:-1], -1)
        probs = torch.softmax(logits, dim=-1)
        # argmax returns the first maximum, i.e. ties go to expert 0 as in DeepSpeed's top1gating
        choice = probs.argmax(dim=-1)
        # release: combine weight = un-renormalised top-1 probability, cast to the activation dtype
        weight = probs.gather(1, choice[:, None]).to(x.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows = (choice == e).nonzero(as_tuple=True)[0]
            if rows.numel():
                out.index_copy_(0, rows, expert(flat[rows]) * weight[rows])
        return out.view(shape)
