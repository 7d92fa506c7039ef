"""Every wording of the demo data: targets, grounding requests, closed and region questions, answers.

One home for these strings: the dataset builder (:mod:`.demo_dataset`), the acceptance evaluation
(:mod:`monai_medplib.demo_acceptance`) and the tests read them from here.

Closed questions come in two sets per question kind: ``TRAIN`` wordings (they include the example questions of
the README, the bundle docs and the MONAI Label app) and ``HELD_OUT`` wordings that no training conversation
uses, so that the evaluation can tell "understands the question" from "recognises a training sentence".
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ABSENT_ANSWER",
    "CLOSED_QUESTIONS",
    "DOC_QUESTIONS",
    "GROUNDING_PHRASES",
    "MODALITY_ANSWERS",
    "NAMING_QUESTIONS",
    "NORMAL_QUESTIONS",
    "PLANES",
    "REGION_CLASSES",
    "REGION_QUESTIONS",
    "TARGETS",
    "Target",
    "absent_answer",
    "modality_answer",
]


@dataclass(frozen=True)
class Target:
    """A structure the demo model grounds.

    Attributes:
        name: canonical name (the region-VQA answer and the name in reports).
        modality: "CT" or "MR": the only modality whose images can show it.
        names: how a request may call it (the first one is the canonical request's).
        noun_phrases: the same names with their article, for "Is ... visible?".
        min_pixels: pixels a slice needs for the structure to count as present; a slice with fewer (but some)
            pixels is ambiguous and never asked about.
    """

    name: str
    modality: str
    names: tuple[str, ...]
    noun_phrases: tuple[str, ...]
    min_pixels: int


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("liver", "CT", ("liver",), ("the liver",), 64),
        Target(
            "tumour",
            "CT",
            ("tumour", "tumor"),
            ("a tumour", "a tumor"),
            32,
        ),
        Target("grey matter", "MR", ("grey matter", "gray matter"), ("grey matter", "gray matter"), 64),
        Target("white matter", "MR", ("white matter",), ("white matter",), 64),
        Target("brain", "MR", ("brain",), ("the brain",), 64),
    )
}
# Region-VQA answers: the tissue under the region (liver = liver tissue outside the tumour).
REGION_CLASSES = ("liver", "tumour", "grey matter", "white matter", "background")
PLANES = ("axial", "coronal", "sagittal")
MODALITY_ANSWERS = {"CT": "CT", "MR": "MRI"}

# MeCoVQA-G style requests (the first one is tokenization.GROUNDING_REQUEST, what viewers send for a bare name).
GROUNDING_PHRASES = (
    "Please segment the {target}.",
    "Segment the {target} in this image.",
    "Can you segment the {target}?",
    "Where is the {target}? Please output the mask.",
    "Please provide a segmentation of the {target}.",
    "Show me the {target} in this slice.",
    "Outline the {target}.",
    "Could you mark the {target} in this scan?",
)
ABSENT_ANSWER = "No {target} is visible in this image."
# Demo-only auxiliary rounds: a grounding request followed by a question about what it asks for, answered with the
# canonical target name. Its answer must be read off the request at a last prompt position, as the <SEG> state is;
# an LLM trained from scratch learns to read the requested target there far sooner with this direct signal than from
# the mask loss alone (a stand-in for the pretrained LLaMA's reading skills).
NAMING_QUESTIONS = ("Which structure does this request name?", "What is this request about?")

# question kind -> {"train": wordings, "held_out": wordings}; visible questions take a noun phrase.
CLOSED_QUESTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "modality": {
        "train": (
            "What modality is this image?",
            "Which imaging modality is this?",
            "Is this a CT or an MRI image?",
            "What kind of scan is this?",
            "Which modality was used to acquire this image?",
            "What type of image is this?",
            "Which modality is shown in this image?",
            "Is this image from a CT or an MRI scanner?",
            "What imaging technique produced this image?",
            "Name the modality of this image.",
        ),
        "held_out": ("What imaging modality is shown here?", "Was this image acquired with CT or MRI?"),
    },
    "plane": {
        "train": (
            "Which plane is this?",
            "Which plane is this image: axial, coronal or sagittal?",
            "In which plane was this slice taken?",
            "Is this an axial, coronal or sagittal slice?",
            "What is the orientation of this slice?",
            "Which anatomical plane is shown?",
            "What plane is shown in this image?",
            "Which view is this slice: axial, coronal or sagittal?",
            "What is the imaging plane of this slice?",
            "Name the plane of this image.",
        ),
        "held_out": ("In which anatomical plane is this image?", "Is this slice axial, coronal or sagittal?"),
    },
    "visible": {
        "train": (
            "Is {target} visible?",
            "Is {target} visible in this image?",
            "Is {target} visible in this slice?",
            "Does this slice show {target}?",
            "Can you see {target} in this image?",
            "Does this image contain {target}?",
        ),
        "held_out": ("Is {target} shown in this slice?", "Do you see {target} in this scan?"),
    },
}

# Region questions: ``{region}`` marks where the region goes; a question without it gets the region appended at
# the end, as MedPLIBPipeline.answer_region does for a question that does not place it.
REGION_QUESTIONS = (
    "What is inside this region? {region}",
    "What is the object in this region? {region}",
    "What is this? {region}",
    "What is in the region? {region}",
    "What is {region}?",
    "What is in the box? {region}",
    "What is it? {region}",
    "What is inside {region}?",
    "What does the region {region} show?",
    "Which tissue is in {region}?",
)
NORMAL_QUESTIONS = ("Is {region} normal?", "Is the tissue in {region} normal?")  # "no" only for tumour

# The example questions of README.md, bundle/docs/README.md and apps/medplib (its README and its tasks' default
# questions); the acceptance asks them. tests/unit/test_doc_questions.py reads the docs and keeps this list equal to
# what they show.
DOC_QUESTIONS = {
    "modality": ("What modality is this image?",),
    "plane": ("Which plane is this?",),
    "visible": (
        ("Is the liver visible in this slice?", "liver"),
        ("Is the liver visible?", "liver"),
    ),
    "region": (
        "What is in this region?",
        "What is the object in this region?",
        "What is this?",
        "What is in the region?",
        "What is <region>?",
    ),
    "normal": ("Is <region> normal?",),
}


def absent_answer(target: str) -> str:
    """The answer to a request for a structure the image does not show (no ``<SEG>``)."""
    return ABSENT_ANSWER.format(target=TARGETS[target].name)


def modality_answer(modality: str) -> str:
    """Answer to a modality question ("CT" / "MRI")."""
    return MODALITY_ANSWERS[modality]
