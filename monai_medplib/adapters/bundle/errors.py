"""Expected mistakes in a bundle run end in one line on stderr and exit code 2, not in a traceback.

``python -m monai.bundle run`` wraps an exception raised while a config item is evaluated in MONAI's own errors
("Failed to evaluate ConfigExpression ..."), so the message that names the wrong ``input_dict`` key sits in the middle
of a 50-90 line traceback. Every bundle config first imports :mod:`.excepthook`, which installs (through
:func:`install_excepthook`) a ``sys.excepthook`` that looks down the uncaught exception's chain for

* a user error raised by ``monai_medplib`` (:class:`~monai_medplib.user_input.UserInputError`, or one of
  :data:`~monai_medplib.user_input.USER_ERRORS` raised in a ``monai_medplib`` frame), or
* MONAI's "the referring item ``@x`` is not defined" (a text that starts with ``@``: see the bundle README's escape),

and prints that message alone (``error: input_dict['image']: file not found: ...``), exit code 2. A cohort whose
studies failed (:class:`StudiesFailed`) prints its summary, exit code 1. Anything else keeps Python's traceback;
``MEDPLIB_TRACEBACK=1`` keeps it for everything.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from types import TracebackType

from ...user_input import USER_ERRORS, UserInputError

__all__ = ["StudiesFailed", "install_excepthook", "user_message"]

_PACKAGE = str(Path(__file__).resolve().parents[2])
_UNDEFINED_REFERENCE = "the referring item `@"
USER_ERROR_EXIT = 2


class StudiesFailed(RuntimeError):
    """Some studies of a cohort failed (the rest were written); the process exits with code 1."""

    exit_code = 1


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and every exception it was raised from or during, outermost first."""
    seen: list[BaseException] = []
    pending = [error]
    while pending:
        current = pending.pop(0)
        if current is None or any(current is s for s in seen):
            continue
        seen.append(current)
        pending += [current.__cause__, current.__context__]
    return seen


def _raised_in_package(error: BaseException) -> bool:
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(_PACKAGE)


def user_message(error: BaseException) -> tuple[str, int] | None:
    """``(message, exit code)`` when ``error`` (or an exception in its chain) is an expected mistake, else None."""
    for current in reversed(_chain(error)):  # the innermost cause names the problem best
        if isinstance(current, StudiesFailed):
            return str(current), current.exit_code
        if isinstance(current, UserInputError) or (
            isinstance(current, USER_ERRORS) and _raised_in_package(current)
        ):
            return str(current), USER_ERROR_EXIT
        if isinstance(current, ValueError) and str(current).startswith(_UNDEFINED_REFERENCE):
            hint = (
                " (MONAI reads a value that is exactly '@name' as a reference to another config item; "
                "for a prompt text that starts with '@', write it with a backslash: '\\@...')"
            )
            return str(current) + hint, USER_ERROR_EXIT
    return None


def _hook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    found = None if os.environ.get("MEDPLIB_TRACEBACK") == "1" else user_message(error)
    if found is None:
        _previous(kind, error, tb)
        return
    message, code = found
    logging.shutdown()  # flush the run's log handlers before leaving
    print(f"error: {message}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # The exit status of an uncaught exception is always 1; an expected mistake exits like `medplib`'s (2).
    os._exit(code)


_previous = sys.excepthook


def install_excepthook() -> None:
    """Route uncaught exceptions through the one-line user error report (idempotent)."""
    global _previous
    if sys.excepthook is not _hook:
        _previous = sys.excepthook
        sys.excepthook = _hook
