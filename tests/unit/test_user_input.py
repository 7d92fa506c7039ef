"""Parsers of what users type (monai_medplib/user_input.py): the values a client can send that Python's own
parsers fail on with errors naming nothing."""

from __future__ import annotations

import pytest

from monai_medplib.user_input import UserInputError, parse_int, parse_json, parse_slice_selection


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[" * 100_000 + "]" * 100_000, "nests too deep"),  # RecursionError inside json
        ('{"slice": ' + "9" * 5000 + "}", "thousands of digits"),  # ValueError: int() digit limit
        ('{"q": ["ok", {"k": "\\ud800"}]}', "lone surrogate '\\ud800' at character 0"),
        ('{"\\udc80": 1}', "lone surrogate"),  # in a key too
        ("{'a': 1}", "not valid JSON"),
    ],
)
def test_parse_json_names_what_is_wrong(text, words):
    with pytest.raises(UserInputError, match="params") as info:
        parse_json(text, "params")
    assert words in str(info.value)


def test_parse_json_keeps_real_text():
    assert parse_json('{"q": "\\ud83d\\ude00 f\\u00fcr", "n": [1, 2.5]}', "params") == {
        "q": "😀 für",
        "n": [1, 2.5],
    }


@pytest.mark.parametrize("value", ["9" * 5000, "\u00b2", "\u0663", "1_000", "0x10", "12.0"])
def test_parse_int_takes_ascii_digits_only(value):
    with pytest.raises(UserInputError, match="slice must be a whole number") as info:
        parse_int(value, "slice")
    assert len(str(info.value)) < 150  # the value is quoted cut short


def test_parse_int_and_ranges_still_read_what_they_did():
    assert parse_int(" +12 ", "slice") == 12 and parse_int("-3", "k") == -3 and parse_int(7.0, "k") == 7
    assert parse_slice_selection("3, 10-12", 20) == [3, 10, 11, 12]
    for bad in ("0-" + "9" * 5000, "1--3", "\u00b2-3"):
        with pytest.raises(UserInputError, match="is not a range"):
            parse_slice_selection(bad, 20)
