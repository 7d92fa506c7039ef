"""Grounding over a runner: the ``<SEG>`` state of many prompts at once (with the opt-in shortcut), decoded by
SAM-Med2D into masks (:func:`ground_features`, the one grounding core of 2D and volume calls).

Built on :class:`~monai_medplib.pipeline.runner.MedPLIBRunner` primitives (``embed``, ``generate``, the model's
``llm_forward``). Three ways to get the [SEG] state of a prompt, counted in :class:`PathCounts`:

* ``generate`` (default, faithful): greedy decoding of a left-padded batch; the answer text is complete and the
  state is chosen by the release or the clean rule (spec 5.4).
* ``shortcut`` (opt-in ``fast=True``): one prefill. Where ``<SEG>`` is the argmax at the last prompt position
  the answer starts with ``<SEG>`` and its state *is* that last position, so decoding is skipped (the answer
  is reported as the ``<SEG>`` token alone; MeCoVQA-G answers are always ``<SEG></s>``). Samples whose argmax
  is anything else fall back to ``generate``.
* ``forced`` (``force_seg=True``): the answer is forced to ``<SEG></s>`` as the fixtures' oracle did with
  ``forced_decoder_ids``; one prefill, no check. For random-weight models and benchmarks.

The one-prefill paths reuse per-image *prompt-prefix* KV states: causal attention makes the rows up to
``<im_end>`` (system text + 576 image rows) independent of the question, so they are taken from the first
prompt's own (whole) prefill, kept in the runner's feature cache next to the image features, and every
further question about the image prefills only its own ~20 tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

from ..modeling.generation import GREEDY_BELOW_TEMPERATURE, GenerationOutput
from ..processing import binarize
from ..special_tokens import IMAGE_TOKEN_INDEX
from .cache import content_key
from .features import ImageFeatures, image_prefix_length
from .options import GroundingOptions
from .results import GroundingResult, PathCounts
from .runner import MedPLIBRunner

__all__ = ["GROUNDING_MODES", "PrefixState", "SegState", "ground_features", "seg_states"]

GROUNDING_MODES = ("generate", "shortcut", "forced")


@dataclass
class SegState:
    """Result of the language side for one prompt.

    Attributes:
        states: final-norm hidden states ``[H]`` to decode, one per ``<SEG>`` decoded (empty: no mask).
        new_ids: the answer's token ids (EOS included when produced).
        path: "generate", "shortcut" or "forced".
    """

    states: list[torch.Tensor]
    new_ids: list[int]
    path: str

    @property
    def hidden(self) -> torch.Tensor | None:
        """The (first) [SEG] state, None when no ``<SEG>`` was produced."""
        return self.states[0] if self.states else None

    @property
    def has_seg(self) -> bool:
        return bool(self.states)


@dataclass(frozen=True)
class PrefixState:
    """Per-layer keys / values ``[heads, P, head_dim]`` of the prompt rows up to ``<im_end>`` for one image."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]


# ------------------------------------------------------------------------------------------ one-prefill paths
def _split_prefix(ids: Sequence[int]) -> tuple[tuple[int, ...], list[int]] | None:
    """``(ids up to and including <im_end>, the rest)``, or None when there is no image or the rest holds a
    placeholder (region prompts are not grounded here) or is empty."""
    ids = list(ids)
    if IMAGE_TOKEN_INDEX not in ids:
        return None
    cut = image_prefix_length(ids)
    rest = ids[cut:]
    if not rest or min(rest) < 0:
        return None
    return tuple(ids[:cut]), rest


def _prefix_key(features: ImageFeatures, prefix: tuple[int, ...]) -> str:
    return f"prefix|{features.key}|{content_key(np.asarray(prefix))}"


def _whole_prefills(
    runner: MedPLIBRunner, features, prompts, prefix_rows
) -> list[tuple[torch.Tensor, torch.Tensor, PrefixState]]:
    """``(last hidden [H], last logits [V], prefix states)`` of whole prompts: causal attention makes a prompt's
    first ``prefix_rows`` K/V equal to a prefix-only pass, so no second pass over the weights is needed."""
    embeds, mask = runner.embed(features, prompts)
    out = runner.model.llm_forward(embeds, mask, use_cache=True, last_logits_only=True)
    results = []
    for n in range(len(prompts)):
        pad = int(mask.shape[1] - mask[n].sum())  # left padding; positions follow the mask, keys do not move
        window = slice(pad, pad + prefix_rows)
        # clone: a view would keep the whole batch alive and under-count the cache's bytes
        state = PrefixState(
            tuple(layer.keys[n, :, window].clone() for layer in out.past_key_values.layers),
            tuple(layer.values[n, :, window].clone() for layer in out.past_key_values.layers),
        )
        results.append((out.hidden_states[n, -1], out.logits[n, -1], state))
    return results


def _continue_from_prefix(model, states, rests, prefix_rows, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(last hidden [B,H], last logits [B,V])`` of question ids ``rests`` continuing from prefix ``states``."""
    longest = max(len(rest) for rest in rests)
    suffix_ids = torch.zeros(len(rests), longest, dtype=torch.long, device=device)
    mask = torch.zeros(len(rests), prefix_rows + longest, dtype=torch.long, device=device)
    mask[:, :prefix_rows] = 1
    for b, rest in enumerate(rests):  # right padding: the prefix rows stay aligned
        suffix_ids[b, : len(rest)] = torch.tensor(rest)
        mask[b, prefix_rows : prefix_rows + len(rest)] = 1
    kv = DynamicCache(config=model.model.config)
    for layer in range(len(states[0].keys)):
        kv.update(
            torch.stack([s.keys[layer] for s in states]),
            torch.stack([s.values[layer] for s in states]),
            layer,
        )
    hidden = model.llm_forward(model.model.embed_tokens(suffix_ids), mask, past_key_values=kv, use_cache=True)
    last = mask[:, prefix_rows:].sum(dim=1) - 1  # each prompt's own last row
    rows = hidden.hidden_states[torch.arange(len(rests), device=last.device), last]
    return rows, model.lm_head(rows).float()


def _last_states_from_prefix(
    runner: MedPLIBRunner, features, prompts, counts
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(last hidden [B,H], last logits [B,V])`` reusing per-image prefix states; None when the batch does not
    qualify (no cache, an image without key, prefixes of different lengths).

    The first prompt about an image whose prefix is not cached is prefilled whole (its prefix states are kept
    from that pass); every other prompt prefills only its question on the prefix states.
    """
    if not runner.caching or not all(f.key for f in features):
        return None
    split = [_split_prefix(ids) for ids in prompts]
    if any(s is None for s in split) or len({len(s[0]) for s in split}) != 1:
        return None
    keys = [_prefix_key(f, s[0]) for f, s in zip(features, split)]
    found: dict[str, PrefixState] = {}
    for key in dict.fromkeys(keys):
        hit = runner.prefix_state(key)
        if hit is not None:
            found[key] = hit
    whole = [keys.index(k) for k in dict.fromkeys(keys) if k not in found]
    counts.prefix_computed += len(whole)
    counts.prefix_cached += len(keys) - len(whole)
    prefix_rows = len(split[0][0]) - 1 + features[0].clip_feats.shape[0]  # <image> expands to 576 rows
    last = {}
    if whole:
        computed = _whole_prefills(
            runner, [features[b] for b in whole], [prompts[b] for b in whole], prefix_rows
        )
        for b, (hidden, logits, state) in zip(whole, computed):
            found[keys[b]] = state
            runner.keep_prefix_state(keys[b], state)
            last[b] = (hidden, logits)
    rest = [b for b in range(len(prompts)) if b not in last]
    if rest:
        hidden, logits = _continue_from_prefix(
            runner.model,
            [found[keys[b]] for b in rest],
            [split[b][1] for b in rest],
            prefix_rows,
            runner.device,
        )
        last.update({b: (hidden[n], logits[n]) for n, b in enumerate(rest)})
    return (
        torch.stack([last[b][0] for b in range(len(prompts))]),
        torch.stack([last[b][1] for b in range(len(prompts))]),
    )


def _last_states(
    runner: MedPLIBRunner, features, prompts, counts, reuse_prefix: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(last hidden [B,H], last-row logits [B,V])``, in chunks of ``runner.prefill_batch_size``."""
    step = runner.prefill_batch_size or len(prompts)
    hidden, logits = [], []
    for start in range(0, len(prompts), step):
        chunk = slice(start, start + step)
        last = None
        if reuse_prefix:
            last = _last_states_from_prefix(runner, features[chunk], prompts[chunk], counts)
        if last is None:
            out = runner.prefill(features[chunk], prompts[chunk], last_logits_only=True)
            last = out.hidden_states[:, -1], out.logits[:, -1]
        hidden.append(last[0])
        logits.append(last[1])
    return torch.cat(hidden), torch.cat(logits)


# ------------------------------------------------------------------------------------------ all paths
def _generated_states(
    out: GenerationOutput, b: int, seg_id: int, all_seg: bool, seg_rule: str
) -> list[torch.Tensor]:
    ids = out.new_ids[b]
    if all_seg:
        return [out.hidden_for_token(b, j) for j, token in enumerate(ids) if token == seg_id]
    state = out.seg_hidden_states(seg_id, release_quirk=seg_rule == "release")[b]
    return [] if state is None else [state]


@torch.no_grad()
def seg_states(
    runner: MedPLIBRunner,
    features: Sequence[ImageFeatures],
    prompts: Sequence[Sequence[int]],
    options: GroundingOptions | None = None,
    *,
    reuse_prefix: bool = True,
    counts: PathCounts | None = None,
) -> list[SegState]:
    """The [SEG] states and answer ids of every prompt of a batch (``prompts[b]`` is about ``features[b]``).

    Args:
        runner: whose primitives (and caches) are used.
        features: per prompt, its image's features.
        prompts: per prompt the model ids with ``-200`` for the image (lengths may differ).
        options: ``fast`` takes the one-prefill shortcut where ``<SEG>`` is the greedy argmax at the last prompt
            position (not with ``all_seg`` or sampling, which need the whole answer); ``force_seg`` forces the
            answer ``<SEG></s>`` (no check, no decoding); ``all_seg`` gives one state per ``<SEG>`` (clean rule)
            on the generate path; ``seg_rule`` selects the generate path's first ``<SEG>`` state (spec 5.4);
            ``max_new_tokens`` / ``temperature`` / ``seed`` drive decoding.
        reuse_prefix: on the one-prefill paths, continue from cached per-image prompt-prefix states.
        counts: incremented per path.
    """
    if len(prompts) != len(features):
        raise ValueError(f"{len(features)} images but {len(prompts)} prompts")
    opts = GroundingOptions() if options is None else options
    tokenizer = runner.tokenizer
    seg_id, eos_id = tokenizer.seg_id, tokenizer.eos_id
    counts = counts if counts is not None else PathCounts()
    states: list[SegState | None] = [None] * len(prompts)
    todo = list(range(len(prompts)))
    shortcut = opts.fast and not opts.all_seg and opts.temperature < GREEDY_BELOW_TEMPERATURE
    if opts.force_seg or shortcut:
        hidden, logits = _last_states(runner, features, prompts, counts, reuse_prefix)
        todo = []
        for b in range(len(prompts)):
            if opts.force_seg:
                # the forced tokens would only be fed back after this state: one prefill gives what forced
                # decoding gives (spec 5.4, j = 0)
                states[b] = SegState([hidden[b]], [seg_id, eos_id], "forced")
                counts.forced += 1
            elif int(logits[b].argmax()) == seg_id:
                states[b] = SegState([hidden[b]], [seg_id], "shortcut")
                counts.shortcut += 1
            else:
                todo.append(b)
    if todo:
        out = runner.generate(
            [features[b] for b in todo],
            [prompts[b] for b in todo],
            None,
            opts.max_new_tokens,
            opts.temperature,
            opts.seed,
        )
        for n, b in enumerate(todo):
            states[b] = SegState(
                _generated_states(out, n, seg_id, opts.all_seg, opts.seg_rule), out.new_ids[n], "generate"
            )
        counts.generate += len(todo)
    return states  # type: ignore[return-value]


@torch.no_grad()
def ground_features(
    runner: MedPLIBRunner,
    features: Sequence[ImageFeatures],
    prompts: Sequence[Sequence[int]],
    options: GroundingOptions | None = None,
    counts: PathCounts | None = None,
) -> list[GroundingResult]:
    """The grounding core (2D and volumes): [SEG] states of ``prompts[b]`` about ``features[b]``, one SAM
    decoder batch, post-processing; ``counts`` gets the path each prompt took."""
    opts = GroundingOptions() if options is None else options
    states = seg_states(runner, features, prompts, opts, counts=counts)
    owners = [b for b, state in enumerate(states) for _ in state.states]
    if owners:
        # the text prompts are kept on the results: click refinement decodes with them again
        seg_embeds = runner.seg_embeddings(torch.stack([s for state in states for s in state.states]))
        owner_features = [features[b] for b in owners]
        low_res, iou = runner.decode_text_prompts(owner_features, seg_embeds)
        logits = runner.postprocess_batch(low_res, owner_features)
    results, row = [], 0
    for b, state in enumerate(states):
        answer = runner.decode_text(state.new_ids)
        if not state.has_seg:
            results.append(GroundingResult.empty(features[b].original_size, answer, state.new_ids))
            continue
        result = GroundingResult.from_logits(
            logits[row], answer, state.new_ids, low_res[row], iou[row], seg_embeds[row]
        )
        if opts.all_seg:
            mine = logits[row : row + len(state.states)]
            result.all_probs = [torch.sigmoid(x).cpu().numpy() for x in mine]
            result.all_masks = [binarize(x).cpu().numpy() for x in mine]
        results.append(result)
        row += len(state.states)
    return results
