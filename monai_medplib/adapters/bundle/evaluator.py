"""The MONAI Bundle's evaluator: MeCoVQA metrics (grounding mIoU / mDice, VQA) written to the bundle's output."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...evaluation import TASKS, evaluate_mecovqa
from ...io.outputs import write_json
from ...pipeline import MedPLIBPipeline

__all__ = ["MeCoVQAEvaluator"]

logger = logging.getLogger(__name__)


class MeCoVQAEvaluator:
    """The bundle's evaluator: :func:`~monai_medplib.evaluation.evaluate_mecovqa` on a MeCoVQA-layout split
    (the demo dataset's ``test/`` files or the release test files), written to ``output_dir``.

    Args:
        pipeline: the loaded pipeline.
        data_root: root the MeCoVQA image / mask paths are relative to.
        files: task -> JSON file (relative to ``data_root``); tasks: "grounding", "vqa", "region_vqa".
        output_dir: where ``metrics.json`` (the report) and ``predictions.json`` (one row per sample) go.
        max_samples: records per file (the first ones; None = all).
        max_new_tokens: decoding budget per answer.
        force_seg: force ``<SEG></s>`` for grounding (random-weight models).
        batch_size: samples per generation batch.
        official_eval_region: drop the region feature in region VQA, as the release evaluation script does.
    """

    def __init__(
        self,
        pipeline: MedPLIBPipeline,
        data_root: str | os.PathLike,
        files: Mapping[str, str],
        output_dir: str | os.PathLike,
        max_samples: int | None = 20,
        max_new_tokens: int = 64,
        force_seg: bool = False,
        batch_size: int = 8,
        official_eval_region: bool = False,
    ) -> None:
        self.pipeline = pipeline
        self.data_root = Path(data_root)
        self.files = dict(files)
        self.output_dir = Path(output_dir)
        self.options = {
            "limit": max_samples,
            "max_new_tokens": int(max_new_tokens),
            "force_seg": bool(force_seg),
            "batch_size": int(batch_size),
            "official_eval_region": bool(official_eval_region),
        }
        unknown = sorted(set(self.files) - set(TASKS))
        if unknown:
            raise ValueError(f"evaluation files: unknown tasks {unknown}; use {list(TASKS)}")

    def run(self) -> dict[str, Any]:
        report, table, rows = evaluate_mecovqa(self.pipeline, self.data_root, self.files, **self.options)
        write_json(self.output_dir / "metrics.json", report)
        write_json(self.output_dir / "predictions.json", {"predictions": rows})
        logger.info("evaluation (%d samples, %.1f s)\n%s", report["samples"], report["seconds"], table)
        return report
