"""MONAI Label app for MedPLIB: pixel grounding, VQA, region VQA and click refinement for 3D Slicer and OHIF.

Start it with ``medplib serve --studies DIR|DICOMWEB_URL`` (or ``monailabel start_server --app
apps/medplib --studies ... --conf model demo``). Its ``--conf`` options are listed in ``apps/medplib/README.md``.

Every task is listed by ``GET /info/`` with its labels, dimension and an editable ``config`` (the free-text
``text`` / ``question`` fields of Slicer's and OHIF's option tables); a request without them gets those values.
The server around the app is hardened by ``monai_medplib.adapters.monailabel`` (also under a plain ``monailabel
start_server``): see "Running on a hospital network" in the repository's README.
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
from lib.engine import MedPLIBEngine, check_conf_keys
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask

import monai_medplib
from monai_medplib.adapters.monailabel.datastore import GuardedLocalDatastore, guard_dicomweb
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
        harden_running_server(studies)  # also under a plain `monailabel start_server` (no launcher of ours)
        check_conf_keys(conf)
        self.engine = MedPLIBEngine.from_conf(conf)
        self.volume_limits = self.engine.limits  # the server's upload checks use the same limits
        self.list_masks = parse_bool(conf.get("list_masks", "false"), "--conf list_masks")
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

    def init_datastore(self) -> Datastore:
        """A local studies folder as a :class:`GuardedLocalDatastore`; a DICOMweb root as MONAI Label builds it,
        with its ids checked."""
        if self.studies.startswith(("http://", "https://")):
            return guard_dicomweb(super().init_datastore())
        return GuardedLocalDatastore(
            self.studies,
            limits=self.volume_limits,
            list_masks=self.list_masks,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def info(self) -> dict[str, Any]:
        meta = super().info()
        meta["medplib"] = self.engine.stats()
        return meta

    def init_infers(self) -> dict[str, InferTask]:
        return {name: config.infer() for name, config in self.task_configs.items()}

    def init_strategies(self) -> dict[str, Any]:
        from monailabel.tasks.activelearning.first import First
        from monailabel.tasks.activelearning.random import Random

        return {"random": Random(), "first": First()}
