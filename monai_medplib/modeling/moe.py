"""Deepspeed-free top-1 mixture-of-experts MLP with the release (DeepSpeed 0.13.1) parameter names (spec 2.6).

Child names reproduce ``deepspeed.moe.layer.MoE`` so that release keys load unchanged:
``deepspeed_moe.gate.wg.weight`` and ``deepspeed_moe.experts.deepspeed_experts.{e}.{gate,up,down}_proj.weight``.
The layer computes ``y = p_top1(x) * Expert_top1(x)`` with the router in fp32; no process group is needed.
Like DeepSpeed's ``top1gating`` (``drop_tokens=True``, random token selection), an expert takes at most
``ceil(T / E * factor)`` of the ``T`` tokens of a call (padding included; at least ``min_capacity``), with
``factor = capacity_factor`` (1.5) in training and ``eval_capacity_factor`` (2.0) in eval mode; the tokens it
keeps are those with the highest uniform random score, and a dropped token's MLP output is zero (the residual
carries it). With the release's 2 experts and 2.0, no token can be dropped at inference; in training an
expert chosen by more than 75 % of the tokens drops the excess, as in the release's stage-IV training.
"""

from __future__ import annotations

import math

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
    optional auxiliary loss); ``record_router_logits = False`` turns that off. ``last_dropped`` counts the
    tokens the latest call dropped for capacity.

    Args:
        hidden_size / intermediate_size: LLaMA MLP sizes.
        num_experts: experts per layer (release: 2).
        capacity_factor / eval_capacity_factor / min_capacity: DeepSpeed's capacity rule in training / eval.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int = 2,
        capacity_factor: float = 1.5,
        eval_capacity_factor: float = 2.0,
        min_capacity: int = 0,
    ):
        super().__init__()
        self.deepspeed_moe = _DeepSpeedMoE(hidden_size, intermediate_size, num_experts)
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.record_router_logits = True
        self.last_router_logits: torch.Tensor | None = None
        self.last_dropped = 0

    def capacity(self, num_tokens: int) -> int:
        """Tokens one expert may take out of ``num_tokens`` in the current (training / eval) mode."""
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return max(math.ceil(num_tokens / len(self.experts) * factor), self.min_capacity)

    def _kept(self, choice: torch.Tensor) -> torch.Tensor | None:
        """Which tokens stay within their expert's capacity; None when no expert overflows (no random draw)."""
        capacity = self.capacity(choice.numel())
        if capacity >= choice.numel():  # inference with the release factors: no count, no host sync
            return None
        if int(torch.bincount(choice, minlength=len(self.experts)).max()) <= capacity:
            return None
        score = torch.rand(choice.shape, device=choice.device)  # DeepSpeed's RTS: uniform(0, 1) per token
        kept = torch.zeros_like(choice, dtype=torch.bool)
        for e in range(len(self.experts)):
            rows = (choice == e).nonzero(as_tuple=True)[0]
            if rows.numel() > capacity:
                rows = rows[score[rows].topk(capacity).indices]
            kept[rows] = True
        return kept

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
        kept = self._kept(choice)
        self.last_dropped = 0 if kept is None else int((~kept).sum())
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            routed = choice == e
            rows = (routed if kept is None else routed & kept).nonzero(as_tuple=True)[0]
            if rows.numel():
                out.index_copy_(0, rows, expert(flat[rows]) * weight[rows])
        return out.view(shape)
