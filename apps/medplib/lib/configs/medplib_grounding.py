"""Task config for ``medplib_grounding`` (``--conf grounding_text`` sets the default text)."""

from lib.configs._base import MedPLIBTaskConfig
from lib.infers.grounding import MedPLIBGrounding


class MedPLIBGroundingConfig(MedPLIBTaskConfig):
    def infer(self) -> MedPLIBGrounding:
        return MedPLIBGrounding(self.engine, text=self.conf.get("grounding_text", "liver"))
