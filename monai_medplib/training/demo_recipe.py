"""The demo model recipe: architecture sizes, tokenizer, stage schedule (used by ``scripts/train_demo.py``).

Same architecture as the release (LLaMA decoder with top-1 2-expert MoE MLPs, CLIP ViT at 336 px / patch 14 ->
576 image tokens, SAM-Med2D with adapters at 256 px, 256-d prompt encoder / mask decoder), shrunk in width and
depth so that the whole recipe trains on 2 CPU cores in under 90 minutes (the model card gives the measured time)
and the bf16 weights stay well under 30 MB.
The stage schedule (step counts, batch, oversampling, frozen parts) lives in ``scripts/train_demo.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..config import RELEASE_CLIP, MedPLIBConfig
from ..tokenization import TEMPLATES
from .sp_tokenizer import train_sentencepiece

_PATHS = re.compile(r"(<mask>|<region>).*?(</mask>|</region>)", re.S)
DEMO_BASE_VOCAB = 1000  # SentencePiece target; the trainer stops earlier on the small corpus


def demo_config(vocab_size: int, moe: bool = False) -> MedPLIBConfig:
    """Demo sizes: LLaMA 2 x 128 (4 heads, MLP 344), CLIP 4 x 96, SAM encoder 4 x 96 with adapters."""
    clip = dict(
        RELEASE_CLIP, hidden_size=96, intermediate_size=192, num_hidden_layers=4, num_attention_heads=2
    )
    sam = {
        "encoder_embed_dim": 96,
        "encoder_depth": 4,
        "encoder_num_heads": 4,
        "encoder_global_attn_indexes": (1, 3),
    }
    return MedPLIBConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        clip=clip,
        mm_hidden_size=96,
        sam=sam,
        moe_enable=moe,
    )


def tokenizer_corpus(data_root: str | Path) -> list[str]:
    """Every text of the demo training files (file paths in ``<mask>`` / ``<region>`` left out: the model never
    sees them) plus the two system prompts and role names."""
    texts = [t.system for t in TEMPLATES.values()] + ["USER: ASSISTANT:"]
    for path in sorted((Path(data_root) / "train").glob("MeCoVQA-*.json")):
        for entry in json.loads(path.read_text()):
            texts += [_PATHS.sub(r"\1\2", str(turn["value"])) for turn in entry["conversations"]]
    return texts


def build_demo_tokenizer(data_root: str | Path, out_dir: str | Path) -> Path:
    """Train the demo SentencePiece tokenizer on the training conversations (held-out files are not read)."""
    return train_sentencepiece(tokenizer_corpus(data_root), out_dir, vocab_size=DEMO_BASE_VOCAB)
