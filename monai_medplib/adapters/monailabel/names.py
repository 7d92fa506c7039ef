"""The rules for every name a client gives the server that becomes part of a path: image ids, label tags,
uploaded file names, session ids, DICOM UIDs. Each check raises :class:`UserInputError` saying what is wrong.

Lookups (``?image=`` on downloads and infers) only resolve ids the datastore already lists; every name that
creates or removes a file goes through here first.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

from ...user_input import UserInputError

MAX_NAME_CHARS = 128
# 3D Slicer uploads a volume under its node name ("2: CT Abdomen", "Lebér"): letters and digits of any script,
# spaces, ':' and '()' too; never a separator, and no leading '.' or space, no trailing space
_ID = re.compile(r"[^\W_](?:[\w .:()-]*[\w).-])?")
_TAG = re.compile(r"[A-Za-z0-9_-]{1,64}")
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_SEPARATORS = ("/", "\\", "\x00")


def _problem(value: str) -> str | None:
    """What makes ``value`` unusable as one path component (None when nothing does)."""
    if not value:
        return "is empty"
    if any(s in value for s in _SEPARATORS) or os.path.isabs(value):
        return "contains a path separator"
    if value in (".", "..") or ".." in value:
        return "contains '..'"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "contains control characters"
    if len(value) > MAX_NAME_CHARS:
        return f"is longer than {MAX_NAME_CHARS} characters"
    return None


def image_id(value: str, what: str = "image id") -> str:
    """An id a new image is stored under: letters and digits (any script), spaces, ``. _ - : ( )``; starting with
    a letter or digit, not ending with a space."""
    problem = _problem(value)
    if problem is None and not _ID.fullmatch(value):
        problem = (
            "may only hold letters, digits, spaces and '.', '_', '-', ':', '(', ')', must start with a letter or digit "
            "and not end with a space"
        )
    if problem:
        raise UserInputError(f"{what} {value!r} {problem}")
    return value


def label_tag(value: str) -> str:
    """A label tag (the folder under ``labels/``): letters, digits, ``_``, ``-``; at most 64."""
    problem = _problem(value)
    if problem is None and not _TAG.fullmatch(value):
        problem = "may only hold letters, digits, '_' and '-' (at most 64)"
    if problem:
        raise UserInputError(f"label tag {value!r} {problem}")
    return value


def upload_name(value: str | None, field: str) -> str:
    """The last component of the client's name of an uploaded file (3D Slicer sends its full local path),
    used inside the request's own staging folder."""
    value = "" if value is None else str(value)
    value = value.replace("\\", "/").rsplit("/", 1)[-1]
    problem = _problem(value)
    if problem:
        raise UserInputError(f"the file uploaded as {field!r} has the name {value[:80]!r}, which {problem}")
    return value


def session_id(value: str) -> str:
    """A session id (the server gives out UUIDs)."""
    try:
        return str(uuid.UUID(str(value)))
    except ValueError as err:
        raise UserInputError(f"session_id {str(value)[:80]!r} is not a session id (a UUID)") from err


def dicom_uid(value: str, what: str = "series") -> str:
    """A DICOM UID (digits and dots, at most 64 characters)."""
    if not isinstance(value, str) or len(value) > 64 or not _UID.fullmatch(value):
        raise UserInputError(
            f"{what} id {str(value)[:80]!r} is not a DICOM UID (digits and dots, at most 64)"
        )
    return value


def inside(path: str | Path, root: str | Path) -> Path:
    """``path`` resolved, checked to lie under ``root`` (also resolved: symlinks cannot lead out).

    Raises:
        UserInputError: the path leaves ``root``.
    """
    resolved, base = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    if resolved != base and base not in resolved.parents:
        raise UserInputError(f"{Path(path).name!r} would be written outside the server's folder")
    return resolved
