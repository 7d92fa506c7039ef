"""Train a small LLaMA-style SentencePiece tokenizer and write it in the release tokenizer layout.

The demo model cannot use the LLaMA tokenizer (not shipped offline), so it gets its own BPE model trained on
the demo corpus with the options LLaMA's ``tokenizer.model`` was trained with (byte fallback, split digits,
dummy prefix, no normalisation), followed by the 267 MedPLIB added tokens in release order. The files written are
those ``transformers`` 4.31 ``save_pretrained`` writes for the release slow ``LlamaTokenizer``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path

# LLaMA's trainer spec (read from its tokenizer.model): BPE, byte fallback, digits split, identity normaliser.
LLAMA_LIKE_OPTIONS: dict[str, object] = {
    "model_type": "bpe",
    "byte_fallback": True,
    "split_digits": True,
    "add_dummy_prefix": True,
    "remove_extra_whitespaces": False,
    "normalization_rule_name": "identity",
    "allow_whitespace_only_pieces": True,
    "split_by_unicode_script": True,
    "split_by_whitespace": True,
    "max_sentencepiece_length": 16,
    "character_coverage": 1.0,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
    "unk_surface": " \u2047 ",
    "hard_vocab_limit": False,
}

TOKENIZER_FILES = ("tokenizer.model", "added_tokens.json", "tokenizer_config.json", "special_tokens_map.json")


def _added_token(content: str) -> dict[str, object]:
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }


def train_sentencepiece(corpus: Iterable[str], out_dir: str | Path, vocab_size: int = 512) -> Path:
    """Train the base SentencePiece model on ``corpus`` (one text per item) and write the release tokenizer files.

    Args:
        corpus: texts (questions, answers, system prompts); MedPLIB added tokens inside them are removed first so
            that they never become base pieces.
        out_dir: folder that receives ``tokenizer.model``, ``added_tokens.json``, ``tokenizer_config.json`` and
            ``special_tokens_map.json``.
        vocab_size: base vocabulary size (before the added tokens); at least 259 with byte fallback.

    Returns:
        ``out_dir`` as a Path.
    """
    import sentencepiece as spm

    from ..tokenization import ADDED_TOKENS

    if vocab_size < 300:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-fallback BPE model (needs >= 300)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for text in corpus:
        for token in ADDED_TOKENS:
            text = text.replace(token, " ")
        lines.extend(line for line in text.split("\n") if line.strip())
    if not lines:
        raise ValueError("the tokenizer corpus is empty")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        minloglevel=2,  # warnings and errors only
        **LLAMA_LIKE_OPTIONS,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    base = spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
    write_tokenizer_json(out, base)
    return out


def write_tokenizer_json(out_dir: str | Path, base_vocab_size: int) -> None:
    """Write ``added_tokens.json`` (267 tokens from ``base_vocab_size`` on), ``tokenizer_config.json`` and
    ``special_tokens_map.json`` as the release (transformers 4.31 slow LlamaTokenizer, pad = ``<unk>``)."""
    from ..tokenization import ADDED_TOKENS

    out = Path(out_dir)
    added = {token: base_vocab_size + i for i, token in enumerate(ADDED_TOKENS)}
    (out / "added_tokens.json").write_text(json.dumps(dict(sorted(added.items())), indent=2) + "\n")
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": _added_token("<s>"),
        "clean_up_tokenization_spaces": False,
        "eos_token": _added_token("</s>"),
        "legacy": True,
        "model_max_length": 2048,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": _added_token("<unk>"),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
