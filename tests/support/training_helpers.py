"""Tiny synthetic MeCoVQA data, tokenizer and model config shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from monai_medplib.config import RELEASE_CLIP, MedPLIBConfig
from monai_medplib.data.demo_dataset import build_demo_dataset
from monai_medplib.tokenization import MedPLIBTokenizer
from monai_medplib.training.demo_recipe import tokenizer_corpus
from monai_medplib.training.sp_tokenizer import train_sentencepiece


def synthetic_planes(num_slices: int = 10, size: int = 32, seed: int = 0):
    """Three planes of ``num_slices`` grey images with a bright disc (label 1) holding a dark disc (label 2)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.ogrid[:size, :size]
    for p, plane in enumerate(("sagittal", "coronal", "axial")):
        images, labels = [], []
        for i in range(num_slices):
            cy, cx = size // 2 + (i % 3) - 1, size // 2 + p - 1
            liver = (rows - cy) ** 2 + (cols - cx) ** 2 <= 9**2
            tumour = (rows - cy) ** 2 + (cols - cx - 2) ** 2 <= 4**2
            label = np.where(tumour, 2, np.where(liver, 1, 0)).astype(np.uint8)
            image = (40 + 120 * liver + 60 * tumour + rng.integers(0, 20, (size, size))).astype(np.uint8)
            images.append(image)
            labels.append(label)
        yield plane, images, labels


def build_tiny_data(root: Path) -> tuple[Path, Path, MedPLIBTokenizer]:
    """Synthetic dataset under ``root/data`` and a tokenizer trained on it under ``root/tok``."""
    data = root / "data"
    build_demo_dataset(data, test_fraction=0.2, gap=1, planes=synthetic_planes())
    tok_dir = train_sentencepiece(tokenizer_corpus(data), root / "tok", vocab_size=400)
    return data, tok_dir, MedPLIBTokenizer.from_pretrained(tok_dir)


def tiny_config(vocab_size: int, moe: bool = False) -> MedPLIBConfig:
    """A very small MedPLIB (release structure) for CPU tests."""
    clip = dict(
        RELEASE_CLIP, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    sam = {
        "encoder_embed_dim": 16,
        "encoder_depth": 1,
        "encoder_num_heads": 2,
        "encoder_global_attn_indexes": (0,),
    }
    return MedPLIBConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        clip=clip,
        mm_hidden_size=16,
        sam=sam,
        moe_enable=moe,
    )
