"""Task config for ``medplib_refine`` (``--conf grounding_text`` sets the default text)."""

from lib.configs._base import MedPLIBTaskConfig
from lib.infers.refine import MedPLIBRefine


class MedPLIBRefineConfig(MedPLIBTaskConfig):
    def infer(self) -> MedPLIBRefine:
        return MedPLIBRefine(self.engine, text=self.conf.get("grounding_text", "liver"))
