"""The acceptance's "doc questions" are the questions the docs show: a README example that changes without the list
(it did once: two of the README's questions were not asked, five asked were in no doc) fails here."""

from __future__ import annotations

import re

from monai_medplib.data.demo_prompts import DOC_QUESTIONS
from tests.support.paths import REPO

# where users read example questions: the READMEs' commands and code, the app's default questions
DOCS = (
    "README.md",
    "bundle/docs/README.md",
    "apps/medplib/README.md",
    "apps/medplib/lib/configs/medplib_vqa.py",
    "apps/medplib/lib/configs/medplib_region_vqa.py",
)
QUOTED_QUESTION = re.compile(r"""["']([A-Z][^"'\n]{2,100}\?)["']""")


def test_doc_questions_are_the_questions_the_docs_show():
    shown = {q for doc in DOCS for q in QUOTED_QUESTION.findall((REPO / doc).read_text())}
    listed = {q if isinstance(q, str) else q[0] for questions in DOC_QUESTIONS.values() for q in questions}
    assert shown == listed, {
        "in the docs only": sorted(shown - listed),
        "listed only": sorted(listed - shown),
    }
