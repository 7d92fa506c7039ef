"""Task config for ``medplib_vqa`` (``--conf vqa_question`` sets the default question)."""

from lib.configs._base import MedPLIBTaskConfig
from lib.infers.vqa import MedPLIBVQA


class MedPLIBVQAConfig(MedPLIBTaskConfig):
    def infer(self) -> MedPLIBVQA:
        return MedPLIBVQA(self.engine, question=self.conf.get("vqa_question", "What modality is this image?"))
