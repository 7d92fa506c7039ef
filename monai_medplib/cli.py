"""``medplib`` console entry.

Sub-commands live in :mod:`monai_medplib.commands`, one module each, and are found automatically: a module
``commands/<name>.py`` (not starting with ``_``) defines ``NAME`` (the command word), ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int`` (the exit code). Keep heavy imports (torch, the model) inside
``run`` so that ``medplib --help`` stays fast. Adding ``serve``, ``eval``, ``train``, ``demo`` or ``ground-volume``
means adding one module; this file does not change.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import pkgutil
import sys
from collections.abc import Sequence
from types import ModuleType

from . import __version__, commands
from .commands._common import out_dirs_removed_on_failure
from .user_input import USER_ERRORS

# Besides USER_ERRORS, file-system refusals are the user's to fix (a folder without write permission, a file where
# a folder is needed, a read-only mount, a full disk or quota): one line, exit code 2.
FILE_SYSTEM_ERRORS = (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
FILE_SYSTEM_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT})  # EACCES / EPERM: PermissionError


def command_modules() -> list[ModuleType]:
    """Every sub-command module, sorted by command word."""
    found = []
    for info in pkgutil.iter_modules(commands.__path__):
        if not info.name.startswith("_"):
            found.append(importlib.import_module(f"{commands.__name__}.{info.name}"))
    return sorted(found, key=lambda module: module.NAME)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medplib", description="MedPLIB: medical VQA, region VQA and text-prompted segmentation."
    )
    parser.add_argument("--version", action="version", version=f"monai-medplib {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in command_modules():
        sub = subparsers.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``medplib`` with ``argv`` (default: the process arguments); returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        with out_dirs_removed_on_failure():
            return int(args.run(args))
    except (*USER_ERRORS, *FILE_SYSTEM_ERRORS) as err:
        return _user_error(args.command, err)
    except OSError as err:
        if err.errno not in FILE_SYSTEM_ERRNOS:
            raise
        return _user_error(args.command, err)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] == __package__:
            raise  # a module of this package missing is a bug, not the user's install
        # a package installed apart (README "Installation": monailabel, liver-ct-segmentation-package) is missing
        hint = "" if "pip install" in str(err) else " (README 'Installation' lists what to install)"
        print(f"medplib {args.command}: error: {err}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"medplib {args.command}: interrupted", file=sys.stderr)
        return 130


def _user_error(command: str, err: BaseException) -> int:
    message = " ".join(str(err).split()) or type(err).__name__
    print(f"medplib {command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
