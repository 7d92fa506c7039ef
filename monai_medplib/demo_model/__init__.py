"""The embedded demo model (release layout; see MODEL_CARD.md). ``MedPLIBPipeline.from_pretrained("demo")`` loads it."""

from pathlib import Path

DEMO_MODEL_DIR = Path(__file__).resolve().parent

__all__ = ["DEMO_MODEL_DIR"]
