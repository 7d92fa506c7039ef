"""MedPLIB tokenizer and conversation templates, reproducing the release tokenisation exactly.

The release was trained and evaluated with the transformers 4.31 *slow* ``LlamaTokenizer``
(``use_fast=False, legacy=True``) plus 267 added tokens. Modern transformers tokenise added tokens
differently, so this module rebuilds the 4.31 behaviour on top of ``sentencepiece`` directly:

1. split the text on the added tokens and on ``<s>``, ``</s>``, ``<unk>``;
2. strip whitespace (including newlines) on both sides of every *added* token (not of ``<s>``/``</s>``);
3. encode every remaining text piece with SentencePiece, dummy prefix included (legacy behaviour);
4. for model prompts, split on ``<image>`` first (each chunk is encoded with its own BOS, later BOS
   dropped, chunks joined by ``IMAGE_TOKEN_INDEX``) and insert ``REGION_TOKEN_INDEX`` between every
   adjacent ``<region></region>`` pair.

Token strings and placeholder ids live in :mod:`~monai_medplib.special_tokens`; this module is the home of
the prompt templates.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from .special_tokens import (
    ADDED_TOKENS,
    BOS_TOKEN,
    EOS_TOKEN,
    IGNORE_INDEX,
    IM_END_TOKEN,
    IM_START_TOKEN,
    IMAGE_HEADER,
    IMAGE_PLACEHOLDER,
    IMAGE_TOKEN_INDEX,
    MASK_END_TOKEN,
    MASK_START_TOKEN,
    REGION_END_TOKEN,
    REGION_PAIR,
    REGION_START_TOKEN,
    REGION_TOKEN_INDEX,
    SEG_TOKEN,
    UNK_TOKEN,
)
from .user_input import check_text

_SENTENCEPIECE_SPECIALS = (BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
# transformers' clean_up_tokenization (only applied when a tokenizer_config asks for it).
_CLEANUP_RULES = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


class MedPLIBTokenizer:
    """SentencePiece tokenizer with the 267 MedPLIB added tokens, 4.31-slow-tokenizer compatible.

    Args:
        model_file: path of the SentencePiece ``tokenizer.model``.
        added_tokens: token -> id map (the content of ``added_tokens.json``); by default the 267
            MedPLIB tokens get consecutive ids after the SentencePiece vocabulary.
        clean_up_tokenization_spaces: apply transformers' space clean-up in :meth:`decode` (off for
            the LLaMA tokenizer of the release).
    """

    def __init__(
        self,
        model_file: str | Path,
        added_tokens: Mapping[str, int] | None = None,
        clean_up_tokenization_spaces: bool = False,
    ) -> None:
        model_file = Path(model_file)
        if not model_file.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {model_file}")
        self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self._sp_size = self._sp.get_piece_size()
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self._added_to_id = self._check_added_tokens(added_tokens)
        self._id_to_added = {i: t for t, i in self._added_to_id.items()}
        self._special_to_id = {}
        for token in _SENTENCEPIECE_SPECIALS:
            piece_id = self._sp.piece_to_id(token)
            if token != UNK_TOKEN and piece_id == self._sp.unk_id():
                raise ValueError(f"{model_file}: SentencePiece model has no piece {token!r}")
            self._special_to_id[token] = piece_id
        self._special_ids = frozenset(self._special_to_id.values())
        # Longest first so that no token is cut by a shorter one that is its prefix.
        splitters = sorted([*self._added_to_id, *self._special_to_id], key=len, reverse=True)
        self._split_pattern = re.compile("(" + "|".join(re.escape(t) for t in splitters) + ")")

    def _check_added_tokens(self, added_tokens: Mapping[str, int] | None) -> dict[str, int]:
        if added_tokens is None:
            return {token: self._sp_size + i for i, token in enumerate(ADDED_TOKENS)}
        missing = [t for t in ADDED_TOKENS if t not in added_tokens]
        if missing:
            raise ValueError(f"added tokens lack {len(missing)} MedPLIB tokens: {missing[:10]}")
        ids = sorted(int(i) for i in added_tokens.values())
        if ids != list(range(self._sp_size, self._sp_size + len(ids))):
            raise ValueError(
                f"added token ids must be consecutive from the SentencePiece size {self._sp_size}, "
                f"got {ids[0]}..{ids[-1]} for {len(ids)} tokens"
            )
        return {str(t): int(i) for t, i in added_tokens.items()}

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> MedPLIBTokenizer:
        """Load ``tokenizer.model`` (+ ``added_tokens.json``, ``tokenizer_config.json`` if present)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {directory}")
        added_file = directory / "added_tokens.json"
        added = json.loads(added_file.read_text()) if added_file.is_file() else None
        config_file = directory / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        return cls(
            directory / "tokenizer.model",
            added_tokens=added,
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        )

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``tokenizer.model`` and ``added_tokens.json`` (enough for :meth:`from_pretrained`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tokenizer.model").write_bytes(self._sp.serialized_model_proto())
        (directory / "added_tokens.json").write_text(json.dumps(self._added_to_id, indent=2, sort_keys=True))

    # ----------------------------------------------------------------------------------- ids
    def __len__(self) -> int:
        return self._sp_size + len(self._added_to_id)

    def token_to_id(self, token: str) -> int:
        """Id of an added token, ``<s>``/``</s>``/``<unk>`` or a SentencePiece piece."""
        if token in self._added_to_id:
            return self._added_to_id[token]
        if token in self._special_to_id:
            return self._special_to_id[token]
        piece_id = self._sp.piece_to_id(token)
        if piece_id == self._sp.unk_id():
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return piece_id

    @property
    def bos_id(self) -> int:
        return self._special_to_id[BOS_TOKEN]

    @property
    def eos_id(self) -> int:
        return self._special_to_id[EOS_TOKEN]

    @property
    def pad_id(self) -> int:
        # The release sets pad = unk (id 0).
        return self._special_to_id[UNK_TOKEN]

    @property
    def seg_id(self) -> int:
        return self._added_to_id[SEG_TOKEN]

    @property
    def region_start_id(self) -> int:
        return self._added_to_id[REGION_START_TOKEN]

    @property
    def region_end_id(self) -> int:
        return self._added_to_id[REGION_END_TOKEN]

    @property
    def im_start_id(self) -> int:
        return self._added_to_id[IM_START_TOKEN]

    @property
    def im_end_id(self) -> int:
        return self._added_to_id[IM_END_TOKEN]

    @property
    def colon_id(self) -> int:
        """Id of the ``":"`` piece ending ``ASSISTANT:`` (the release hard-codes 29901)."""
        return self.token_to_id(":")

    # ------------------------------------------------------------------------------ encoding
    def _split(self, text: str) -> list[str]:
        """Split on vocabulary tokens and strip whitespace around added tokens (4.31 slow tokenizer)."""
        check_text(text, "the text")  # sentencepiece cannot take a lone surrogate (its error names nothing)
        parts = [p for p in self._split_pattern.split(text) if p]
        for i, part in enumerate(parts):
            # Only added tokens strip; <s>/</s>/<unk> are AddedTokens with lstrip=rstrip=False.
            if part in self._added_to_id:
                if i + 1 < len(parts) and parts[i + 1]:
                    parts[i + 1] = parts[i + 1].lstrip()
                if i > 0 and parts[i - 1]:
                    parts[i - 1] = parts[i - 1].rstrip()
        return [p for p in parts if p]

    def tokenize(self, text: str) -> list[str]:
        """Token strings of ``text`` (without BOS), as the 4.31 slow tokenizer's ``tokenize``."""
        pieces: list[str] = []
        for part in self._split(text):
            if part in self._added_to_id or part in self._special_to_id:
                pieces.append(part)
            else:
                pieces.extend(self._sp.encode(part, out_type=str))
        return pieces

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Ids of ``text`` as ``tokenizer(text).input_ids``; ``<image>`` is plain text here."""
        ids = [self.bos_id] if add_bos else []
        for part in self._split(text):
            if part in self._added_to_id:
                ids.append(self._added_to_id[part])
            elif part in self._special_to_id:
                ids.append(self._special_to_id[part])
            else:
                ids.extend(self._sp.encode(part))
        return ids

    def encode_prompt(self, text: str) -> list[int]:
        """Model input ids: ``<image>`` -> ``IMAGE_TOKEN_INDEX``, ``REGION_TOKEN_INDEX`` in ``<region></region>``.

        Each ``<image>``-separated chunk is tokenised on its own (own dummy prefix; its BOS is dropped
        except for the first chunk), exactly like the release ``tokenizer_image_token``.
        """
        ids = [self.bos_id]
        for k, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if k:
                ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(self.encode(chunk, add_bos=False))
        return insert_region_placeholders(ids, self.region_start_id, self.region_end_id)

    # ------------------------------------------------------------------------------ decoding
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` as the 4.31 slow tokenizer's ``decode``.

        Only ``<s>``, ``</s>`` and ``<unk>`` count as special: the MedPLIB added tokens are kept and
        joined to the surrounding text with single spaces (``"Sure, it is <SEG> ."``).
        """
        sub_texts: list[str] = []
        run: list[int] = []
        for raw in ids:
            token_id = int(raw)
            if not 0 <= token_id < len(self):
                raise ValueError(f"token id {token_id} is outside the vocabulary (0..{len(self) - 1})")
            if skip_special_tokens and token_id in self._special_ids:
                continue
            if token_id in self._id_to_added:
                if run:
                    sub_texts.append(self._pieces_to_text(run))
                    run = []
                sub_texts.append(self._id_to_added[token_id])
            else:
                run.append(token_id)
        if run:
            sub_texts.append(self._pieces_to_text(run))
        text = " ".join(sub_texts)
        if self.clean_up_tokenization_spaces:
            for old, new in _CLEANUP_RULES:
                text = text.replace(old, new)
        return text

    def _pieces_to_text(self, ids: list[int]) -> str:
        # SentencePiece decodes runs between special pieces; a special piece is preceded by a space
        # unless it is first or follows another special piece.
        out, run, prev_special = "", [], False
        for i, token_id in enumerate(ids):
            if token_id in self._special_ids:
                if not prev_special and i != 0:
                    out += " "
                out += self._sp.decode(run) + self._sp.id_to_piece(token_id)
                run, prev_special = [], True
            else:
                run.append(token_id)
                prev_special = False
        return out + self._sp.decode(run)


def insert_region_placeholders(ids: Sequence[int], region_start_id: int, region_end_id: int) -> list[int]:
    """Insert ``REGION_TOKEN_INDEX`` between every adjacent ``(<region>, </region>)`` id pair."""
    out: list[int] = []
    for i, token_id in enumerate(ids):
        out.append(token_id)
        if token_id == region_start_id and i + 1 < len(ids) and ids[i + 1] == region_end_id:
            out.append(REGION_TOKEN_INDEX)
    return out


# ------------------------------------------------------------------------------ templates
@dataclass(frozen=True)
class ConversationTemplate:
    """A LLaVA ``SeparatorStyle.TWO`` conversation template.

    Attributes:
        name: template key.
        system: system prompt.
        roles: (human role, assistant role).
        sep: separator after the system prompt and after human turns.
        sep2: separator after assistant turns.
    """

    name: str
    system: str
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = EOS_TOKEN

    def render(self, messages: Sequence[str | None]) -> str:
        """Prompt text of alternating human / assistant messages; ``None`` leaves ``"ROLE:"`` open."""
        text = self.system + self.sep
        for i, message in enumerate(messages):
            role = self.roles[i % 2]
            if message:
                text += f"{role}: {message}" + (self.sep, self.sep2)[i % 2]
            else:
                text += f"{role}:"
        return text


_SYSTEM = (
    "A chat between a curious {who} and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the {who}'s questions."
)
TEMPLATES: dict[str, ConversationTemplate] = {
    # Official evaluation (vqa_infer.py, conv_templates["v1"]).
    "vicuna_v1": ConversationTemplate("vicuna_v1", _SYSTEM.format(who="user")),
    # Training (--conv_type llava_v1), the release's and the demo model's.
    "llava_v1": ConversationTemplate("llava_v1", _SYSTEM.format(who="human")),
}

_REGION_WITH_PATH = re.compile(re.escape(REGION_START_TOKEN) + r"(.*?)" + re.escape(REGION_END_TOKEN), re.S)
_MASK_WITH_PATH = re.compile(re.escape(MASK_START_TOKEN) + r"(.*?)" + re.escape(MASK_END_TOKEN), re.S)


def get_template(template: str | ConversationTemplate) -> ConversationTemplate:
    """Template by name (``"vicuna_v1"`` or ``"llava_v1"``)."""
    if isinstance(template, ConversationTemplate):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown conversation template {template!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[template]


def normalize_regions(text: str) -> str:
    """``<region>PATH</region>`` (data) and a bare ``<region>`` (demo) both become ``<region></region>``."""
    text = _REGION_WITH_PATH.sub(REGION_PAIR, text)
    pieces = text.split(REGION_PAIR)
    return REGION_PAIR.join(p.replace(REGION_START_TOKEN, REGION_PAIR) for p in pieces)


def _with_image_header(question: str) -> str:
    # Release: <image> is moved to the front of the turn, text stripped, then wrapped in im_start/end.
    return IMAGE_HEADER + question.replace(IMAGE_PLACEHOLDER, "").strip()


GROUNDING_REQUEST = "Please segment the {target}."  # MeCoVQA-G style request; the demo data's first phrasing


def grounding_prompt(text: str) -> str:
    """A target name ("liver") -> a grounding request ("Please segment the liver."); sentences pass unchanged.

    Viewers and cohort pipelines send structure names; MedPLIB was trained on requests.
    """
    text = text.strip()
    if not text:
        raise ValueError("the grounding text is empty: give a structure name or a request")
    if text.endswith((".", "?", "!")) or len(text.split()) > 6:
        return text
    return GROUNDING_REQUEST.format(target=text)


_MARKUP = re.compile("|".join(re.escape(t) for t in (*ADDED_TOKENS, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)))


def plain_answer(text: str) -> str:
    """An answer as words for people: MedPLIB tokens (``<SEG>``, ``<mask>``...) removed, spaces tidied
    (``"Sure, it is <SEG> ."`` -> ``"Sure, it is."``; a bare ``"<SEG>"`` -> ``""``)."""
    words = " ".join(_MARKUP.sub(" ", text).split())
    return re.sub(r" ([.,;:!?])", r"\1", words)


def build_prompt(
    question: str,
    template: str | ConversationTemplate = "vicuna_v1",
    answer: str | None = None,
    *,
    history: Sequence[tuple[str, str]] = (),
    region: bool = False,
) -> str:
    """Prompt text for one image and a (multi-turn) conversation.

    Args:
        question: the current human question; any ``<image>`` in it is removed (the image goes to
            the front of the first human turn).
        template: ``"vicuna_v1"`` (official evaluation) or ``"llava_v1"`` (training).
        answer: the assistant answer; ``None`` ends the prompt with ``"ASSISTANT:"`` (generation).
        history: earlier (question, answer) turns; the first one carries the image.
        region: a region prompt accompanies the question; if the question has no ``<region>``,
            ``<region></region>`` is appended before ``ASSISTANT:`` like the demo does.
    """
    tpl = get_template(template)
    turns = [*history, (question, answer)]
    messages: list[str | None] = []
    for k, (q, a) in enumerate(turns):
        q = normalize_regions(q)
        if k == len(turns) - 1 and region and REGION_PAIR not in q:
            q = q.rstrip() + " " + REGION_PAIR
        messages += [_with_image_header(q) if k == 0 else q, a]
    return tpl.render(messages)


def conversation_to_prompt(
    conversations: Sequence[Mapping[str, str]], template: str | ConversationTemplate = "llava_v1"
) -> str:
    """Prompt text of a LLaVA-format conversation (``[{"from": "human"|"gpt", "value": ...}, ...]``).

    Mask / region file paths are removed as the release dataset does (``<SEG><mask>p</mask>`` ->
    ``<SEG>``, ``<region>p</region>`` -> ``<region></region>``); a turn holding ``<image>`` gets the
    image header in front.
    """
    tpl = get_template(template)
    turns = list(conversations)
    if turns and turns[0].get("from") != "human":
        turns = turns[1:]  # release: a conversation starting with the assistant drops that turn
    messages: list[str | None] = []
    for j, turn in enumerate(turns):
        speaker = turn.get("from")
        expected = "human" if j % 2 == 0 else "gpt"
        if speaker != expected:
            raise ValueError(f"conversation turn {j} is from {speaker!r}, expected {expected!r}")
        value = _MASK_WITH_PATH.sub("", normalize_regions(str(turn["value"])))
        if IMAGE_PLACEHOLDER in value:
            value = _with_image_header(value)
        messages.append(value)
    return tpl.render(messages)


def build_training_example(
    conversations: Sequence[Mapping[str, str]],
    tokenizer: MedPLIBTokenizer,
    template: str | ConversationTemplate = "llava_v1",
) -> tuple[list[int], list[int]]:
    """Input ids and labels of a training conversation (release ``preprocess_v1`` masking rules).

    Labels are ``IGNORE_INDEX`` everywhere except the assistant answers and the ``</s>`` closing
    each of them. The lengths are measured round by round exactly like the release (round length
    minus 2 for the instruction part, which drops BOS and the space piece after ``ASSISTANT:``); if
    they do not add up to the sequence length the whole example is ignored, as in the release.
    """
    tpl = get_template(template)
    prompt = conversation_to_prompt(conversations, tpl)
    ids = tokenizer.encode_prompt(prompt)
    labels = list(ids)
    answer_sep = tpl.sep + tpl.roles[1] + ": "
    cur = 1
    labels[0] = IGNORE_INDEX
    for rnd in prompt.split(tpl.sep2):
        if rnd == "":
            break
        parts = rnd.split(answer_sep)
        if len(parts) != 2:
            break
        round_len = len(tokenizer.encode_prompt(rnd))
        instruction_len = len(tokenizer.encode_prompt(parts[0] + answer_sep)) - 2
        labels[cur : cur + instruction_len] = [IGNORE_INDEX] * len(labels[cur : cur + instruction_len])
        cur += round_len
    labels[cur:] = [IGNORE_INDEX] * len(labels[cur:])
    total = sum(1 for i in ids if i != tokenizer.pad_id)
    if cur != total:
        warnings.warn(
            f"tokenization mismatch ({cur} vs {total}): example fully ignored, as the release does",
            stacklevel=2,
        )
        labels = [IGNORE_INDEX] * len(ids)
    return ids, labels
