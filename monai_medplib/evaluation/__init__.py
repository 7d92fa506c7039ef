"""Evaluation: the release MeCoVQA protocol (:mod:`.mecovqa`) and the demo model's acceptance figures
(:mod:`.acceptance`, with simulated click refinement in :mod:`.clicks`)."""

from .mecovqa import (
    RELEASE_TEST_FILES,
    TASKS,
    Evaluation,
    build_report,
    evaluate_mecovqa,
    format_table,
    read_eval_samples,
    resolve_eval_files,
)

__all__ = [
    "RELEASE_TEST_FILES",
    "TASKS",
    "Evaluation",
    "build_report",
    "evaluate_mecovqa",
    "read_eval_samples",
    "format_table",
    "resolve_eval_files",
]
