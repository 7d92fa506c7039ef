"""MONAI Label app for MedPLIB: pixel grounding, VQA, region VQA and click refinement for 3D Slicer and OHIF.

Start it with ``medplib serve --studies DIR|DICOMWEB_URL`` (or ``monailabel start_server --app
apps/medplib --studies ... --conf model demo``). Options (``--conf key value``):

=================  =====================================================================================
``model``          model directory, or ``demo`` (default): loaded once at start-up
``device``         ``auto`` (CUDA bf16 if present, else CPU fp32; default), ``cpu`` or ``cuda``
``models``         which tasks, comma-separated, or ``all`` (default): ``medplib_grounding``,
                   ``medplib_vqa``, ``medplib_region_vqa``, ``medplib_refine``
``preload``        ``true`` (default): load the model at start-up instead of on the first request
``force_seg``      ``true``: every grounding decodes a mask (random-weight models, benchmarks); default false
``fast_grounding`` ``true``: opt-in one-prefill grounding (checked per slice, falls back to generation) that
                   reuses a slice's cached prompt prefix for further texts; default false (the release's way)
``grounding_text`` default text of the grounding / refinement tasks; ``vqa_question`` and
                   ``region_question`` default questions
=================  =====================================================================================

Every task is listed by ``GET /info/`` with its labels, dimension and an editable ``config`` (the free-text
``text`` / ``question`` fields of Slicer's and OHIF's option tables).
"""

from __future__ import annotations

import logging
import os
from typing import Any

# monai_medplib is an installed package (pip install -e .); lib.* is this folder's, which MONAI Label puts on
# sys.path while it imports this file.
from lib.configs.medplib_grounding import MedPLIBGroundingConfig
from lib.configs.medplib_refine import MedPLIBRefineConfig
from lib.configs.medplib_region_vqa import MedPLIBRegionVQAConfig
from lib.configs.medplib_vqa import MedPLIBVQAConfig
from lib.engine import MedPLIBEngine
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask

import monai_medplib
from monai_medplib.adapters.monailabel.server import harden_running_server
from monai_medplib.user_input import parse_bool

logger = logging.getLogger(__name__)

TASK_CONFIGS = {
    "medplib_grounding": MedPLIBGroundingConfig,
    "medplib_vqa": MedPLIBVQAConfig,
    "medplib_region_vqa": MedPLIBRegionVQAConfig,
    "medplib_refine": MedPLIBRefineConfig,
}


class MedPLIBApp(MONAILabelApp):
    """MONAI Label app serving one MedPLIB model to all of its infer tasks."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        harden_running_server()  # thread-pool /infer + 4xx errors, also under a plain `monailabel start_server`
        self.engine = MedPLIBEngine.from_conf(conf)
        if parse_bool(conf.get("preload", "true"), "--conf preload"):
            self.engine.load()

        selected = [m.strip() for m in conf.get("models", "all").split(",") if m.strip()]
        if selected == ["all"]:
            selected = list(TASK_CONFIGS)
        unknown = sorted(set(selected) - set(TASK_CONFIGS))
        if unknown:
            raise ValueError(f"--conf models: unknown task(s) {unknown}; available: {sorted(TASK_CONFIGS)}")

        model_dir = os.path.join(app_dir, "model")
        self.task_configs = {}
        for name in selected:
            config = TASK_CONFIGS[name]()
            config.init(name, model_dir, conf, None, engine=self.engine)
            self.task_configs[name] = config

        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="MedPLIB",
            description="MedPLIB: text grounding, VQA and region VQA on CT / MR slices (MONAI Label app)",
            version=monai_medplib.__version__,
        )

    def init_infers(self) -> dict[str, InferTask]:
        return {name: config.infer() for name, config in self.task_configs.items()}

    def init_strategies(self) -> dict[str, Any]:
        from monailabel.tasks.activelearning.first import First
        from monailabel.tasks.activelearning.random import Random

        return {"random": Random(), "first": First()}
