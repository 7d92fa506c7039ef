"""Shared TaskConfig plumbing: every MedPLIB task gets the one engine the app built."""

from __future__ import annotations

from typing import Any

from monailabel.interfaces.config import TaskConfig


class MedPLIBTaskConfig(TaskConfig):
    """A TaskConfig whose ``init`` receives ``engine=`` (the shared :class:`~lib.engine.MedPLIBEngine`)."""

    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs: Any) -> None:
        super().init(name, model_dir, conf, planner, **kwargs)
        if "engine" not in kwargs:
            raise ValueError(f"task config {name!r} needs engine=MedPLIBEngine(...)")
        self.engine = kwargs["engine"]

    def trainer(self) -> None:
        return None  # inference-only app; training lives in monai_medplib.training
