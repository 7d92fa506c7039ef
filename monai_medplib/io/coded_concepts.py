"""SNOMED CT coded concepts of the structures MedPLIB grounds: the one table every DICOM-SEG writer reads.

A DICOM Segmentation names what each segment is with two codes, a *category* (CID 7150: anatomical structure,
morphologically abnormal structure, tissue) and a *type* (CID 7151 and its sub-lists), plus optionally where
an abnormality sits (AnatomicRegionSequence) and a laterality modifier of the type. PACS and viewers index
and colour segments by these codes, not by the free-text label, so "liver" must be coded as Liver, not as
MONAI Label's default (Spleen) or a generic "Tissue".

:func:`coded_concept` reads a grounding text ("liver", "Please segment the liver tumour.", "left kidney",
"gray matter") and returns the concept: an abnormality word (tumour, lesion, cyst ...) wins over the organ it
is found in, which becomes the anatomic region; "left" / "right" become a laterality modifier. Texts that name
nothing in the table get :data:`GENERIC` (Tissue / Tissue, dcmqi's own default). Every code value and meaning
here is pydicom's ``codes.SCT`` entry (checked by the unit tests), written as plain strings so that this table
imports nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "ANATOMICAL_STRUCTURE",
    "GENERIC",
    "MORPHOLOGICALLY_ABNORMAL_STRUCTURE",
    "TISSUE",
    "Code",
    "CodedConcept",
    "coded_concept",
    "known_structures",
]


@dataclass(frozen=True)
class Code:
    """One coded value: ``value`` in coding scheme ``scheme`` ("SCT" = SNOMED CT), with its display meaning."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class CodedConcept:
    """What a segment is, in DICOM's terms.

    Attributes:
        category: SegmentedPropertyCategoryCodeSequence (CID 7150).
        type: SegmentedPropertyTypeCodeSequence (CID 7151 and its sub-lists).
        region: AnatomicRegionSequence: the organ an abnormality lies in (e.g. the liver of a liver tumour).
        modifier: SegmentedPropertyTypeModifierCodeSequence of the type: laterality (Left / Right).
    """

    category: Code
    type: Code
    region: Code | None = None
    modifier: Code | None = None


def _sct(value: str, meaning: str) -> Code:
    return Code(value, "SCT", meaning)


# Categories (CID 7150), with pydicom's current meanings.
ANATOMICAL_STRUCTURE = _sct("91723000", "Anatomical Structure")
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = _sct("49755003", "Morphologically Abnormal Structure")
TISSUE = _sct("85756007", "Tissue")
GENERIC = CodedConcept(TISSUE, TISSUE)

# Anatomical structures: name (lower case, British and American spellings) -> type code.
_ANATOMY: dict[str, Code] = {
    "liver": _sct("10200004", "Liver"),
    "spleen": _sct("78961009", "Spleen"),
    "kidney": _sct("64033007", "Kidney"),
    "pancreas": _sct("15776009", "Pancreas"),
    "stomach": _sct("69695003", "Stomach"),
    "gallbladder": _sct("28231008", "Gallbladder"),
    "duodenum": _sct("38848004", "Duodenum"),
    "small intestine": _sct("30315005", "Small intestine"),
    "small bowel": _sct("30315005", "Small intestine"),
    "colon": _sct("71854001", "Colon"),
    "rectum": _sct("34402009", "Rectum"),
    "esophagus": _sct("32849002", "Esophagus"),
    "oesophagus": _sct("32849002", "Esophagus"),
    "adrenal gland": _sct("23451007", "Adrenal gland"),
    "bladder": _sct("89837001", "Bladder"),
    "urinary bladder": _sct("89837001", "Bladder"),
    "prostate": _sct("41216001", "Prostate"),
    "uterus": _sct("35039007", "Uterus"),
    "aorta": _sct("15825003", "Aorta"),
    "abdominal aorta": _sct("7832008", "Abdominal aorta"),
    "inferior vena cava": _sct("64131007", "Inferior vena cava"),
    "portal vein": _sct("32764006", "Portal vein"),
    "artery": _sct("51114001", "Artery"),
    "blood vessel": _sct("59820001", "Blood Vessel"),
    "vessel": _sct("59820001", "Blood Vessel"),
    "heart": _sct("80891009", "Heart"),
    "left ventricle": _sct("87878005", "Left ventricle"),
    "right ventricle": _sct("53085002", "Right ventricle"),
    "left atrium": _sct("82471001", "Left atrium"),
    "right atrium": _sct("73829009", "Right atrium"),
    "lung": _sct("39607008", "Lung"),
    "trachea": _sct("44567001", "Trachea"),
    "thyroid": _sct("69748006", "Thyroid"),
    "thyroid gland": _sct("69748006", "Thyroid"),
    "breast": _sct("76752008", "Breast"),
    "lymph node": _sct("59441001", "Lymph Node"),
    "brain": _sct("12738006", "Brain"),
    "grey matter": _sct("389081007", "Gray Matter"),
    "gray matter": _sct("389081007", "Gray Matter"),
    "white matter": _sct("389080008", "White Matter"),
    "cerebrospinal fluid": _sct("65216001", "Cerebrospinal Fluid"),
    "csf": _sct("65216001", "Cerebrospinal Fluid"),
    "lateral ventricle": _sct("66720007", "Lateral Ventricle"),
    "cerebral cortex": _sct("40146001", "Cerebral cortex"),
    "cerebellum": _sct("113305005", "Cerebellum"),
    "brain stem": _sct("119238007", "Brain Stem"),
    "brainstem": _sct("119238007", "Brain Stem"),
    "hippocampus": _sct("5366008", "Hippocampus"),
    "thalamus": _sct("42695009", "Thalamus"),
    "putamen": _sct("89278009", "Putamen"),
    "amygdala": _sct("4958002", "Amygdala"),
    "spinal cord": _sct("2748008", "Spinal cord"),
    "spine": _sct("421060004", "Spine"),
    "vertebra": _sct("51282000", "Vertebra"),
    "rib": _sct("113197003", "Rib"),
    "femur": _sct("71341001", "Femur"),
    "sacrum": _sct("54735007", "Sacrum"),
    "skull": _sct("89546000", "Skull"),
    "skin": _sct("39937001", "Skin"),
    "retina": _sct("5665001", "Retina"),
    "cornea": _sct("28726007", "Cornea"),
}
# Structures coded with the "Tissue" category (CID 7166 and cell-level concepts).
_TISSUES: dict[str, Code] = {
    "bone": _sct("3138006", "Bone"),
    "fat": _sct("55603005", "Fat"),
    "adipose tissue": _sct("55603005", "Fat"),
    "muscle": _sct("127954009", "Skeletal muscle"),
    "cell nucleus": _sct("84640000", "Nucleus"),
    "nucleus": _sct("84640000", "Nucleus"),
    "nuclei": _sct("84640000", "Nucleus"),
    "cell": _sct("4421005", "Cell"),
}
# Abnormalities (CID 7159 / 7151): they win over an organ named in the same text, which becomes their region.
_MORPHOLOGY: dict[str, Code] = {
    "tumour": _sct("108369006", "Neoplasm"),
    "tumor": _sct("108369006", "Neoplasm"),
    "neoplasm": _sct("108369006", "Neoplasm"),
    "cancer": _sct("108369006", "Neoplasm"),
    "metastasis": _sct("128462008", "Metastasis"),
    "metastases": _sct("128462008", "Metastasis"),
    "lesion": _sct("52988006", "Lesion"),
    "polyp": _sct("52988006", "Lesion"),  # no "polyp" morphology in DICOM's lists: the lesion it is
    "mass": _sct("4147007", "Mass"),
    "nodule": _sct("27925004", "Nodule"),
    "cyst": _sct("367643001", "Cyst"),
    "necrosis": _sct("6574001", "Necrosis"),
    "hemorrhage": _sct("50960005", "Hemorrhage"),
    "haemorrhage": _sct("50960005", "Hemorrhage"),
    "edema": _sct("79654002", "Edema"),
    "oedema": _sct("79654002", "Edema"),
    "hematoma": _sct("35566002", "Hematoma"),
    "haematoma": _sct("35566002", "Hematoma"),
    "pleural effusion": _sct("60046008", "Pleural effusion"),
}
# Laterality modifiers (CID 244), for the paired structures of the table.
_LATERALITY = {"left": _sct("7771000", "Left"), "right": _sct("24028007", "Right")}
_PAIRED = frozenset(
    ("kidney", "lung", "adrenal gland", "breast", "lateral ventricle", "hippocampus", "thalamus", "putamen")
    + ("amygdala", "femur", "rib", "retina", "cornea")
)

_WORDS = re.compile(r"[a-z]+")


def known_structures() -> dict[str, CodedConcept]:
    """Every name of the table with its concept (a bare name, no region or laterality)."""
    out = {name: CodedConcept(ANATOMICAL_STRUCTURE, code) for name, code in _ANATOMY.items()}
    out.update({name: CodedConcept(TISSUE, code) for name, code in _TISSUES.items()})
    out.update(
        {name: CodedConcept(MORPHOLOGICALLY_ABNORMAL_STRUCTURE, code) for name, code in _MORPHOLOGY.items()}
    )
    return out


def _find(words: list[str], table: dict[str, Code]) -> tuple[int, str] | None:
    """``(position, name)`` of the longest table name found as whole words in ``words`` (first one on ties)."""
    best: tuple[int, int, str] | None = None  # (-length, position, name)
    for name in table:
        parts = name.split()
        for start in range(len(words) - len(parts) + 1):
            if words[start : start + len(parts)] == parts:
                candidate = (-len(parts), start, name)
                if best is None or candidate < best:
                    best = candidate
                break
    return None if best is None else (best[1], best[2])


def coded_concept(text: str) -> CodedConcept:
    """The coded concept of a grounding text (a structure name or a whole request), :data:`GENERIC` if unknown.

    Examples: "liver" -> Anatomical Structure / Liver; "Please segment the liver tumour." -> Morphologically
    Abnormal Structure / Neoplasm in the Liver; "left kidney" -> Kidney with the modifier Left.
    """
    words = _WORDS.findall(str(text).lower())
    abnormality = _find(words, _MORPHOLOGY)
    organ = _find(words, _ANATOMY)
    if abnormality is not None:
        region = None if organ is None else _ANATOMY[organ[1]]
        return CodedConcept(MORPHOLOGICALLY_ABNORMAL_STRUCTURE, _MORPHOLOGY[abnormality[1]], region=region)
    if organ is not None:
        position, name = organ
        side = words[position - 1] if position > 0 else ""
        modifier = _LATERALITY.get(side) if name in _PAIRED else None
        return CodedConcept(ANATOMICAL_STRUCTURE, _ANATOMY[name], modifier=modifier)
    tissue = _find(words, _TISSUES)
    if tissue is not None:
        return CodedConcept(TISSUE, _TISSUES[tissue[1]])
    return GENERIC
