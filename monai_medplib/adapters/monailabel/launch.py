"""The security side of the ``medplib serve`` command line: flags, the settings they become (``MEDPLIB_*``
variables, read again by the hardened app), the checks made before anything starts, and the log configuration
(console only unless ``--enable logs``: MONAI Label's default writes every request's text to a file that
``/logs`` serves)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from ...user_input import UserInputError
from .settings import (
    DEFAULT_MAX_UPLOAD_MB,
    ENV_ALLOWED_HOSTS,
    ENV_AUTH_TOKEN,
    ENV_AUTH_TOKEN_FILE,
    ENV_CORS_ORIGINS,
    ENV_ENABLE,
    ENV_INSECURE_NO_AUTH,
    ENV_MAX_UPLOAD_MB,
    FEATURES,
    ServerSettings,
)

LOG_FORMAT = (
    "[%(asctime)s] [%(process)s] [%(threadName)s] [%(levelname)s] (%(name)s:%(lineno)d) - %(message)s"
)


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for authentication, browser access, operational routes and upload size."""
    group = parser.add_argument_group("security (see README: Running on a hospital network)")
    group.add_argument(
        "--auth-token-file",
        default=None,
        metavar="FILE",
        help=f"require the token in FILE on every request (or set {ENV_AUTH_TOKEN_FILE} / {ENV_AUTH_TOKEN}); "
        "needed to listen on a non-loopback --host",
    )
    group.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="allow a non-loopback --host without a token (only behind a proxy that authenticates)",
    )
    group.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="URL",
        help="a browser origin allowed to call the server from another site, e.g. https://viewer:3000 "
        "(repeatable; default: none)",
    )
    group.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another Host header name to accept (loopback names always are; repeatable)",
    )
    group.add_argument(
        "--enable",
        action="append",
        default=[],
        choices=sorted(FEATURES),
        help="turn on an operational route family that is off by default (repeatable): "
        + "; ".join(f"{f.name}: {f.what}" for f in FEATURES.values()),
    )
    group.add_argument(
        "--max-upload-mb",
        type=int,
        default=None,
        metavar="MB",
        help=f"largest request body in MiB (default {DEFAULT_MAX_UPLOAD_MB})",
    )


def serve_environment(args: argparse.Namespace, env: dict[str, str] | None = None) -> dict[str, str]:
    """The ``MEDPLIB_*`` variables the flags set (flags win over variables already set)."""
    env = dict(os.environ if env is None else env)
    if args.auth_token_file:
        env[ENV_AUTH_TOKEN_FILE] = str(Path(args.auth_token_file).resolve())
        env.pop(ENV_AUTH_TOKEN, None)
    if args.insecure_no_auth:
        env[ENV_INSECURE_NO_AUTH] = "true"
    if args.cors_origin:
        env[ENV_CORS_ORIGINS] = ",".join(args.cors_origin)
    if args.allowed_host:
        env[ENV_ALLOWED_HOSTS] = ",".join(args.allowed_host)
    if args.enable:
        env[ENV_ENABLE] = ",".join(dict.fromkeys(args.enable))
    if args.max_upload_mb is not None:
        env[ENV_MAX_UPLOAD_MB] = str(args.max_upload_mb)
    return {k: v for k, v in env.items() if k.startswith("MEDPLIB_")}


def check_before_start(args: argparse.Namespace, env: dict[str, str]) -> ServerSettings:
    """The settings, the bind address and the device, checked before the slow start (one-line errors).

    Raises:
        UserInputError: a bad setting, a non-loopback ``--host`` without a token, or ``--device cuda``
            without CUDA.
    """
    settings = ServerSettings.from_env(env)
    settings.check_bind(args.host)
    if args.device != "auto":
        from ...devices import resolve_device

        try:
            resolve_device(args.device)
        except ValueError as err:
            raise UserInputError(f"--device {args.device}: {err}") from err
    return settings


def write_log_config(state: Path, app: Path, settings: ServerSettings) -> Path:
    """A logging configuration for ``monailabel start_server --log_config``: the console, plus MONAI Label's
    ``<app>/logs/app.log`` only with ``--enable logs`` (the file ``/logs`` serves)."""
    handlers: dict[str, Any] = {"console": {"class": "logging.StreamHandler", "formatter": "simple"}}
    root = ["console"]
    if "logs" in settings.enabled:
        handlers["file_handler"] = {
            "class": "logging.handlers.RotatingFileHandler",
            "formatter": "simple",
            "filename": str(app / "logs" / "app.log"),
            "backupCount": 10,
            "maxBytes": 10 * 2**20,
            "encoding": "utf-8",
        }
        root.append("file_handler")
        (app / "logs").mkdir(parents=True, exist_ok=True)
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"simple": {"format": LOG_FORMAT}},
        "handlers": handlers,
        "root": {"level": "INFO", "handlers": root},
        "loggers": {
            "uvicorn": {"level": "INFO", "propagate": False, "handlers": ["console"]},
            "uvicorn.access": {"level": "WARNING", "propagate": False, "handlers": ["console"]},
            "urllib3.connectionpool": {"level": "ERROR", "propagate": False, "handlers": ["console"]},
        },
    }
    from ...io.atomic import atomic_write_text

    path = state / "logging.json"
    atomic_write_text(path, json.dumps(config, indent=2))
    return path
