"""The bundle's ``train#trainer`` and ``train#dataset``: one MedPLIB training stage under MONAI's train keys.

MONAI's train workflow (and model-zoo's checks) expect ``device``, ``train#trainer`` with ``max_epochs`` and
``train#dataset``; a MedPLIB stage (:func:`monai_medplib.training.run.run_stage`) counts optimizer steps. The trainer
here runs the stage on the configured device and, when ``max_epochs`` is given, turns it into steps from the size of
the stage's training set (``train#dataset``: the records of the stage's release files, each repeated as
``task_repeat`` says, which is what one epoch of the stage reads).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ...data.mecovqa import read_mecovqa
from ...training.distributed import cleanup, init_distributed
from ...training.run import TASK_FILES, StageRun, run_stage
from ...training.stages import get_stage

__all__ = ["BundleTrainer", "stage_records", "steps_for_epochs"]


def stage_records(
    stage: str, data_root: str | Path, task_repeat: Mapping[str, int] | None = None
) -> list[Any]:
    """The training records one epoch of ``stage`` reads: each task's release file, ``task_repeat[task]`` times."""
    records: list[Any] = []
    for task in get_stage(stage).tasks:
        entries = read_mecovqa(Path(data_root) / TASK_FILES[task], data_root, check_files=False)
        records += entries * int((task_repeat or {}).get(task, 1))
    return records


def steps_for_epochs(samples: int, max_epochs: float, samples_per_step: int) -> int:
    """Optimizer steps for ``max_epochs`` passes over ``samples`` (at least one step)."""
    if max_epochs <= 0:
        raise ValueError(f"max_epochs must be > 0, got {max_epochs}")
    return max(1, math.ceil(samples * max_epochs / max(1, samples_per_step)))


class BundleTrainer:
    """Train one MedPLIB stage from the bundle (``train#trainer``).

    Args:
        stage_run: the stage's inputs (data root, output folder, loop settings, starting model).
        dataset: the stage's training records (``train#dataset``); its length is one epoch.
        device: where to train ("cpu", "cuda" or a torch.device); several processes under ``torchrun``.
        max_epochs: passes over ``dataset``; None keeps ``stage_run.train.max_steps``.
    """

    def __init__(
        self,
        stage_run: StageRun,
        dataset: Sequence[Any],
        device: str | torch.device = "cpu",
        max_epochs: float | None = None,
    ) -> None:
        self.stage_run = stage_run
        self.dataset = dataset
        self.device = torch.device(device)
        self.max_epochs = max_epochs

    def run(self) -> dict[str, object]:
        """Train the stage, save the merged model to ``<out_dir>/hf`` and return the stage's summary."""
        ctx = init_distributed(self.device.type)
        try:
            run = self.stage_run
            if self.max_epochs is not None:
                per_step = run.train.batch_size * run.train.grad_accum * ctx.world_size
                steps = steps_for_epochs(len(self.dataset), float(self.max_epochs), per_step)
                run = replace(run, train=replace(run.train, max_steps=steps))
            return run_stage(run, ctx)
        finally:
            cleanup(ctx)
