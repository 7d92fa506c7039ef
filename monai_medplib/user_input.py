"""Reading values that users type (CLI flags, bundle ``input_dict`` keys, MONAI Label ``--conf`` and request
params): one parser per kind, each failing with a :class:`UserInputError` that names the key and the value.

Front ends catch :class:`UserInputError` (and the other expected mistakes listed in :data:`USER_ERRORS`) and
show its message alone: one line, no traceback.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")
MAX_SLICE_SELECTION = 4096  # more slices than any CT / MR series has; bounds the work a request can ask for
# ASCII digits only (str.isdigit() also takes "²", which int() refuses), at most 18 of them: an int64, and far below
# Python's 4,300-digit limit on int(text)
_WHOLE_NUMBER = re.compile(r"[+-]?[0-9]{1,18}")


class UserInputError(ValueError):
    """An expected mistake in what a user gave (a value, a key, a file); its message is meant for them."""


# What front ends treat as the user's mistake rather than a bug: shown as one line, exit code 2 / HTTP 4xx.
USER_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, NotADirectoryError, TypeError)


def first_line(err: BaseException) -> str:
    """The first line of a library's error message (their details run to tracebacks), or its type's name."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages that quote what a user sent."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def check_text(value: Any, name: str) -> None:
    """Refuse text that is not valid Unicode anywhere inside ``value`` (strings, and those in lists / dicts).

    A lone UTF-16 surrogate (``"\\ud800"`` in JSON, or a byte of a non-UTF-8 command line that Python kept as
    ``\\udcff``) is a valid ``str`` that no tokenizer or file format can encode.

    Raises:
        UserInputError: naming ``name`` and the character's position.
    """
    pending = [value]
    while pending:  # a stack, not recursion: JSON nests as deep as the parser allowed
        item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as err:
                char = item[err.start]
                raise UserInputError(
                    f"{name} is not valid Unicode text: a lone surrogate {char!r} at character {err.start}"
                ) from None
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list | tuple):
            pending.extend(item)


def parse_json(text: str, name: str) -> Any:
    """A client's JSON text, decoded; its strings checked with :func:`check_text`.

    Raises:
        UserInputError: not JSON, nested too deep, a number too long for Python to read, or text that is not
            valid Unicode, naming ``name``.
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserInputError(f"{name} is not valid JSON: {err}") from err
    except RecursionError:
        raise UserInputError(f"{name} is not usable JSON: it nests too deep") from None
    except ValueError:  # Python refuses to read an integer of more than 4,300 digits
        raise UserInputError(
            f"{name} is not usable JSON: it holds a number with thousands of digits"
        ) from None
    check_text(value, name)
    return value


def parse_bool(value: Any, name: str) -> bool:
    """``True`` / ``False``, or one of :data:`TRUE_WORDS` / :data:`FALSE_WORDS` (any case).

    Raises:
        UserInputError: anything else (numbers other than 0 / 1, free text), naming ``name``.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise UserInputError(f"{name} must be true or false, got {shown(value)}")


def parse_int(value: Any, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """A whole number (an int, or a string of digits); booleans and fractions are refused, not truncated.

    Raises:
        UserInputError: not a whole number, or outside ``[minimum, maximum]``.
    """
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and _WHOLE_NUMBER.fullmatch(value.strip()):
        number = int(value.strip())
    if number is None:
        raise UserInputError(f"{name} must be a whole number, got {shown(value)}")
    if minimum is not None and number < minimum or maximum is not None and number > maximum:
        lo = "" if minimum is None else f">= {minimum}"
        hi = "" if maximum is None else f"<= {maximum}"
        raise UserInputError(f"{name} must be {' and '.join(x for x in (lo, hi) if x)}, got {number}")
    return number


# The k to use when turning keyframe grounding on, chosen from benchmarks/keyframes.py (benchmarks/RESULTS.md,
# "Keyframe grounding", issue 18). Off (exact, the release's way) stays the default everywhere.
RECOMMENDED_KEYFRAMES = 8


def parse_keyframes(value: Any, name: str = "keyframes", *, allow_off: bool = True) -> int | None:
    """Keyframe spacing of volume grounding: ``None`` / ``""`` / ``"off"`` / ``0`` -> None (exact, the release's
    way), else a whole number >= 1 (the LLM runs on every k-th slice).

    Args:
        value: what the user gave.
        name: the key or flag named in the error.
        allow_off: False where leaving the setting out is the way to say "exact" (a CLI flag): then only a whole
            number >= 1 is accepted.

    Raises:
        UserInputError: anything else, naming ``name``.
    """
    off_word = isinstance(value, str) and value.strip().lower() in ("", "off", "none", "exact")
    if allow_off and (value is None or off_word):
        return None
    k = parse_int(value, name, minimum=0 if allow_off else 1)
    return None if k == 0 else k


def parse_slice_selection(value: Any, num_slices: int, name: str = "slices") -> list[int] | None:
    """Slices of a volume: ``None`` / ``""`` / ``"all"`` (every slice, returned as None), an index, a list of
    indices, or text ``"k"``, ``"a-b"`` (inclusive), ``"a,b,c"`` and mixtures (``"3, 10-12"``).

    Returns:
        Sorted distinct indices, all in ``[0, num_slices)``; None for every slice.

    Raises:
        UserInputError: a token that is not an index or a range, a range that runs backwards, an index outside
            the volume, or a range wider than the volume (checked before any list is built).
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "all")):
        return None
    tokens: Sequence[Any]
    if isinstance(value, str):
        tokens = [t.strip() for t in value.replace(";", ",").split(",") if t.strip()]
    elif isinstance(value, int) and not isinstance(value, bool):
        tokens = [value]
    elif isinstance(value, list | tuple):
        tokens = value
    else:
        raise UserInputError(f"{name} must be 'all', an index, 'a-b' or 'a,b,c'; got {shown(value)}")
    if not tokens:
        raise UserInputError(f"{name} is empty: give slice indices, or 'all'")
    chosen: set[int] = set()
    for token in tokens:
        if isinstance(token, str) and "-" in token[1:]:
            first, last = (part.strip() for part in token.split("-", 1))
            if not (_WHOLE_NUMBER.fullmatch(first) and _WHOLE_NUMBER.fullmatch(last)) or "-" in first + last:
                raise UserInputError(f"{name}: {shown(token)} is not a range 'a-b' of slice indices")
            lo, hi = int(first), int(last)
            if hi < lo:
                raise UserInputError(f"{name}: range {token!r} runs backwards; write it as '{hi}-{lo}'")
            if hi >= num_slices:
                raise UserInputError(
                    f"{name}: range {token!r} goes past the last slice ({num_slices} slices: 0-{num_slices - 1})"
                )
            chosen.update(range(lo, hi + 1))
            continue
        index = parse_int(token, f"{name} entry", minimum=0)
        if index >= num_slices:
            raise UserInputError(f"{name}: slice {index} is outside the volume ({num_slices} slices)")
        chosen.add(index)
        if len(chosen) > MAX_SLICE_SELECTION:
            raise UserInputError(f"{name}: more than {MAX_SLICE_SELECTION} slices requested")
    return sorted(chosen)
