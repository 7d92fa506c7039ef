"""What the grounding commands print: one line per text saying whether it was found, where, how much, and the
model's own words (MedPLIB tokens removed). The JSON report holds the same facts in full."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any


def ranges(indices: Iterable[int]) -> str:
    """``[3, 4, 5, 9]`` -> ``"3-5, 9"``."""
    runs: list[list[int]] = []
    for i in sorted(set(indices)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


MAX_SAID = 80  # characters of one answer shown on a report line (the JSON report keeps it whole)


def _short(text: str) -> str:
    return text if len(text) <= MAX_SAID else text[: MAX_SAID - 3].rstrip() + "..."


def _said(answers: Mapping[str, int] | str) -> str:
    if isinstance(answers, str):
        return f'the model said "{_short(answers)}"' if answers else "the model said nothing but <SEG>"
    if not answers:
        return "the model said nothing but <SEG>"
    shown = list(answers.items())[:3]
    words = "; ".join(f'"{_short(text)}" ({n} slice{"s" if n != 1 else ""})' for text, n in shown)
    return f"the model said {words}" + (" ..." if len(answers) > 3 else "")


def volume_lines(summary: Mapping[str, Any]) -> list[str]:
    """Lines for a :meth:`~monai_medplib.pipeline.results.VolumeGroundingResult.summary`."""
    axis, slices = summary["axis"], summary["slices"]
    lines = []
    for text, t in summary["targets"].items():
        if t["found"]:
            where = f"on {len(t['slices_with_mask'])} of {len(slices)} {axis} slices ({ranges(t['slices_with_mask'])})"
            lines.append(
                f"{text}: found, {t['voxels']} voxels = {t['volume_ml']} mL, {where}; {_said(t['answers'])}"
            )
        else:
            why = "no slice produced <SEG>" if not t["slices_with_seg"] else "<SEG> gave no mask above 0.1"
            lines.append(
                f"{text}: not found on the {len(slices)} {axis} slices ({why}); {_said(t['answers'])}"
            )
    return lines


def passes_line(summary: Mapping[str, Any]) -> str:
    """How many prompts ran the language model, of how many (slices x texts), and whether keyframes were used."""
    paths = summary.get("paths", {})
    slices, texts = len(summary["slices"]), len(summary["targets"])
    k = paths.get("keyframes")
    how = "exact: every slice" if k is None else f"keyframes every {k} slices"
    per = f"{slices} slice{'s' * (slices != 1)} x {texts} text{'s' * (texts != 1)}"
    return f"language model passes: {paths.get('llm_passes', 0)} for {per} ({how})"


def image_lines(summary: Mapping[str, Any]) -> list[str]:
    """Lines for the 2D summary of ``medplib ground``."""
    lines = []
    for text, t in summary["targets"].items():
        if t["found"]:
            lines.append(f"{text}: found, {t['pixels']} pixels; {_said(t['answer'])}")
        else:
            if not t["has_seg"]:
                why = "no <SEG> in the answer"
            elif t["own_pixels"]:
                why = f"its {t['own_pixels']} pixels went to a more probable text"
            else:
                why = "<SEG> gave no mask above 0.1"
            lines.append(f"{text}: not found ({why}); {_said(t['answer'])}")
    return lines


def print_report(lines: list[str], report: Mapping[str, Any], as_json: bool) -> None:
    """``report`` as one JSON object (``--json``), else the lines and the files written."""
    if as_json:
        print(json.dumps(report))
        return
    for line in lines:
        print(line)
    for name, path in report.get("outputs", {}).items():
        print(f"{name}: {path}")
