"""The MONAI Label app's --conf options: the README's table and the app's list agree, and an unknown key stops the
start (a misspelt ``quantisation`` must not start an unquantised server in silence)."""

from __future__ import annotations

import re
import sys

import pytest

from monai_medplib.user_input import UserInputError
from tests.support.paths import REPO

APP_DIR = REPO / "apps" / "medplib"
sys.path.insert(0, str(APP_DIR))

from lib.engine import CONF_KEYS, check_conf_keys  # noqa: E402


def test_the_readme_table_lists_exactly_the_app_s_options():
    readme = (APP_DIR / "README.md").read_text()
    section = readme[readme.index("| `model` | `demo` |") :].split("\n\n")[0]
    documented = re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M)
    assert sorted(documented) == sorted(CONF_KEYS)


def test_unknown_keys_are_refused_naming_the_closest_option():
    check_conf_keys({"model": "demo", "quantization": "int8", "models": "all"})
    with pytest.raises(UserInputError, match=r"--conf quantisation: .* \(did you mean 'quantization'\?\)"):
        check_conf_keys({"model": "demo", "quantisation": "int4"})
    with pytest.raises(
        UserInputError, match=r"--conf dtype: not an option of the MedPLIB app; its options: model"
    ):
        check_conf_keys({"dtype": "bfloat16"})
