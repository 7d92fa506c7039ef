"""The SNOMED CT table of monai_medplib.io.coded_concepts, checked against pydicom's own code dictionary."""

from __future__ import annotations

import pytest
from pydicom.sr.codedict import codes

from monai_medplib.io.coded_concepts import (
    ANATOMICAL_STRUCTURE,
    GENERIC,
    MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
    TISSUE,
    coded_concept,
    known_structures,
)


def _pydicom_sct() -> dict[str, set[str]]:
    """SNOMED CT code value -> the meanings pydicom's code dictionary gives it."""
    meanings: dict[str, set[str]] = {}
    for keyword in codes.SCT.dir():
        code = getattr(codes.SCT, keyword)
        meanings.setdefault(code.value, set()).add(code.meaning)
    return meanings


def test_every_code_of_the_table_is_a_pydicom_sct_code_with_that_meaning():
    sct = _pydicom_sct()
    concepts = list(known_structures().values())
    concepts += [coded_concept("left kidney"), coded_concept("right lung"), coded_concept("liver tumour")]
    used = {
        c for concept in concepts for c in (concept.category, concept.type, concept.region, concept.modifier)
    }
    for code in filter(None, used):
        assert code.scheme == "SCT"
        assert code.meaning in sct.get(code.value, set()), (code, sct.get(code.value))


def test_categories_are_the_cid_7150_entries():
    cid7150 = {getattr(codes.cid7150, k).value for k in codes.cid7150.dir()}
    for category in (ANATOMICAL_STRUCTURE, MORPHOLOGICALLY_ABNORMAL_STRUCTURE, TISSUE):
        assert category.value in cid7150
    assert {c.category for c in known_structures().values()} == {
        ANATOMICAL_STRUCTURE,
        MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
        TISSUE,
    }


@pytest.mark.parametrize(
    "text, category, kind",
    [
        # the structures of the demo model and of the issue (codes read off pydicom's codes.SCT by hand)
        ("liver", "91723000", "10200004"),
        ("Please segment the liver.", "91723000", "10200004"),
        ("spleen", "91723000", "78961009"),
        ("kidney", "91723000", "64033007"),
        ("grey matter", "91723000", "389081007"),
        ("Segment the gray matter in this image.", "91723000", "389081007"),
        ("white matter", "91723000", "389080008"),
        ("brain", "91723000", "12738006"),
        ("tumour", "49755003", "108369006"),
        ("Where is the tumor? Please output the mask.", "49755003", "108369006"),
        ("lung nodule", "49755003", "27925004"),
        ("bone", "85756007", "3138006"),
        ("right ventricle", "91723000", "53085002"),
    ],
)
def test_known_texts(text, category, kind):
    concept = coded_concept(text)
    assert (concept.category.value, concept.type.value) == (category, kind)


def test_an_abnormality_keeps_its_organ_as_anatomic_region():
    concept = coded_concept("liver tumour")
    assert concept.type.meaning == "Neoplasm" and concept.region.value == "10200004"
    assert coded_concept("tumour").region is None


def test_laterality_of_paired_organs_only():
    assert coded_concept("left kidney").modifier.value == "7771000"
    assert coded_concept("Please segment the right kidney.").modifier.value == "24028007"
    assert coded_concept("kidney").modifier is None
    assert coded_concept("left liver").modifier is None  # not a paired organ
    assert coded_concept("left ventricle").modifier is None  # its own structure


def test_unknown_names_fall_back_to_generic_tissue():
    assert coded_concept("zorbulon") == GENERIC
    assert coded_concept("") == GENERIC
    assert (GENERIC.category.value, GENERIC.type.value) == ("85756007", "85756007")
