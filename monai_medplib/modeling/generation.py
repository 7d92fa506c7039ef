"""KV-cache decoding that keeps every final-norm hidden state (for the [SEG] rule of spec 5.4)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

# The demo worker samples only above this temperature; below it decoding is greedy.
GREEDY_BELOW_TEMPERATURE = 1e-4


@dataclass
class GenerationOutput:
    """Decoded tokens plus the hidden states the [SEG] head needs.

    Attributes:
        new_ids: per sample, the generated ids (EOS included when produced, nothing after it).
        hidden_states: ``[B, L + T, H]`` final-norm states of every processed position: the ``L`` prompt
            positions (prefill) then one per fed-back token (the last generated token is never processed).
        prompt_length: ``L``, the expanded (padded) prompt length.
        step_logits: ``[B, steps, V]`` fp32 logits used at each step, when requested.
    """

    new_ids: list[list[int]]
    hidden_states: torch.Tensor
    prompt_length: int
    step_logits: torch.Tensor | None = None

    def hidden_for_token(self, batch_index: int, j: int) -> torch.Tensor:
        """State whose LM-head output predicted generated token ``j``: expanded position ``L-1+j``."""
        return self.hidden_states[batch_index, self.prompt_length - 1 + j]

    def seg_hidden_states(self, seg_id: int, release_quirk: bool = False) -> list[torch.Tensor | None]:
        """Per sample, the hidden state for the first ``seg_id`` (None when not generated).

        ``release_quirk=True`` reproduces the release ``evaluate()`` bug: with exactly one [SEG] it takes position
        ``L-1+(n-2)`` (n = generated tokens), identical to the clean rule for ``<SEG></s>`` answers. With one
        generated token (``max_new_tokens=1``) that position would be a prompt row: the clean rule's state is taken.
        """
        out: list[torch.Tensor | None] = []
        for b, ids in enumerate(self.new_ids):
            if seg_id not in ids:
                out.append(None)
                continue
            j = ids.index(seg_id)
            if release_quirk and ids.count(seg_id) == 1 and len(ids) >= 2:
                j = len(ids) - 2
            out.append(self.hidden_for_token(b, j))
        return out


Generators = torch.Generator | Sequence[torch.Generator] | None  # one for the batch, or one per sample


def _next_tokens(logits: torch.Tensor, temperature: float, generator: Generators) -> torch.Tensor:
    if temperature < GREEDY_BELOW_TEMPERATURE:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if isinstance(generator, Sequence):  # a sample draws the same tokens whatever else is in its batch
        return torch.cat(
            [torch.multinomial(probs[b : b + 1], 1, generator=g)[:, 0] for b, g in enumerate(generator)]
        )
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class CausalDecoder(Protocol):
    """What decoding needs of a model (``MedPLIBForCausalLM`` has it); a protocol keeps this module below the model."""

    model: Any  # holds ``embed_tokens``

    def llm_forward(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any
    ) -> Any: ...


def generate(
    model: CausalDecoder,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    eos_id: int,
    temperature: float = 0.0,
    generator: Generators = None,
    return_step_logits: bool = False,
) -> GenerationOutput:
    """Prefill ``inputs_embeds`` then decode up to ``max_new_tokens`` tokens per sample (stop at ``eos_id``);
    ``generator`` may be one per sample."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    batch, length = inputs_embeds.shape[:2]
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, dtype=torch.long, device=inputs_embeds.device)
    if not bool(attention_mask[:, -1].all()):
        raise ValueError(
            "greedy_generate needs left padding: the last prompt position is padding for some sample"
        )
    out = model.llm_forward(inputs_embeds, attention_mask, use_cache=True, last_logits_only=True)
    cache, positions = out.past_key_values, (attention_mask.long().cumsum(-1) - 1)[:, -1:]
    hidden, step_logits = [out.hidden_states], []
    new_ids: list[list[int]] = [[] for _ in range(batch)]
    finished = torch.zeros(batch, dtype=torch.bool, device=inputs_embeds.device)
    for step in range(max_new_tokens):
        logits = out.logits[:, -1]
        if return_step_logits:
            step_logits.append(logits)
        tokens = _next_tokens(logits, temperature, generator)
        tokens = torch.where(finished, torch.full_like(tokens, eos_id), tokens)
        for b in range(batch):
            if not finished[b]:
                new_ids[b].append(int(tokens[b]))
        finished |= tokens == eos_id
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        positions = positions + 1
        embeds = model.model.embed_tokens(tokens[:, None])
        out = model.llm_forward(
            embeds, attention_mask, past_key_values=cache, position_ids=positions, use_cache=True
        )
        cache = out.past_key_values
        hidden.append(out.hidden_states)
    logits_out = torch.stack(step_logits, dim=1) if return_step_logits else None
    return GenerationOutput(new_ids, torch.cat(hidden, dim=1), length, logits_out)
