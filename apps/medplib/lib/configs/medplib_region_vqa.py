"""Task config for ``medplib_region_vqa`` (``--conf region_question`` sets the default question)."""

from lib.configs._base import MedPLIBTaskConfig
from lib.infers.region_vqa import MedPLIBRegionVQA


class MedPLIBRegionVQAConfig(MedPLIBTaskConfig):
    def infer(self) -> MedPLIBRegionVQA:
        default = "What is the object in this region?"
        return MedPLIBRegionVQA(self.engine, question=self.conf.get("region_question", default))
