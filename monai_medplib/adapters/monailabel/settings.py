"""What an operator chooses for a MedPLIB server: the auth token, browser origins, host names, the operational
routes that are on, the upload size limit, and where the server keeps its own files.

The one home of the ``MEDPLIB_*`` environment variable names: ``medplib serve``'s flags set them, and a plain
``monailabel start_server --app apps/medplib`` reads them, so both run with the same settings.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ...user_input import UserInputError, parse_bool, parse_int

ENV_AUTH_TOKEN = "MEDPLIB_AUTH_TOKEN"
ENV_AUTH_TOKEN_FILE = "MEDPLIB_AUTH_TOKEN_FILE"
ENV_CORS_ORIGINS = "MEDPLIB_CORS_ORIGINS"
ENV_ALLOWED_HOSTS = "MEDPLIB_ALLOWED_HOSTS"
ENV_ENABLE = "MEDPLIB_ENABLE"
ENV_MAX_UPLOAD_MB = "MEDPLIB_MAX_UPLOAD_MB"
ENV_INSECURE_NO_AUTH = "MEDPLIB_INSECURE_NO_AUTH"
ENV_STATE_DIR = "MEDPLIB_STATE_DIR"

DEFAULT_MAX_UPLOAD_MB = 1024  # a 512 x 512 x 1000 int16 series uncompressed is 500 MiB
MIN_TOKEN_CHARS = 16
STATE_FOLDER = ".medplib"  # inside a local studies folder: staging, sessions, the log config
AUTH_COOKIE = "medplib_token"


@dataclass(frozen=True)
class Feature:
    """An operational route family that is off unless the operator turns it on.

    Attributes:
        name: the word given to ``--enable`` / ``MEDPLIB_ENABLE``.
        what: what it does, for the refusal message.
        routes: ``(path prefix, methods)`` pairs it covers; ``methods`` None means every method.
    """

    name: str
    what: str
    routes: tuple[tuple[str, frozenset[str] | None], ...] = ()


_ALL = None
_WRITE = frozenset({"POST", "PUT", "DELETE", "PATCH"})
FEATURES: dict[str, Feature] = {
    f.name: f
    for f in (
        Feature("logs", "/logs serves the server log, with the text of every request", (("/logs", _ALL),)),
        Feature("batch", "/batch starts a second model-loading process", (("/batch", _ALL),)),
        Feature("train", "/train starts training processes", (("/train", _ALL),)),
        Feature("scoring", "/scoring starts scoring processes", (("/scoring", _ALL),)),
        Feature("models", "/model uploads and downloads model files", (("/model", _ALL),)),
        Feature("reload", "/reload builds a second app (and model)", (("/reload", _ALL),)),
        Feature(
            "wsi",
            "/infer/wsi reads whole-slide images by server path",
            (("/infer/wsi", _ALL), ("/infer/wsi_v2", _ALL)),
        ),
        Feature("dataset", "/datastore/dataset zips every image and label", (("/datastore/dataset", _ALL),)),
        Feature("archives", "PUT /session/?uncompress=true unpacks uploaded archives"),
        Feature(
            "stow",
            "writes through /proxy/dicom send data to the PACS",
            (("/proxy/dicom/stow", _ALL), ("/proxy/dicom", _WRITE)),
        ),
    )
}


@dataclass(frozen=True)
class ServerSettings:
    """The operator's choices (see the module docstring); :meth:`from_env` reads them.

    Attributes:
        auth_token: the bearer token every request must carry (None: no authentication).
        cors_origins: browser origins allowed to call the server from another site (empty: none).
        allowed_hosts: extra ``Host`` header names accepted (loopback names always are).
        enabled: names of :data:`FEATURES` turned on.
        max_upload_bytes: largest request body.
        insecure_no_auth: the operator accepts a non-loopback bind without a token (a proxy authenticates).
    """

    auth_token: str | None = None
    cors_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    enabled: frozenset[str] = field(default_factory=frozenset)
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * 2**20
    insecure_no_auth: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServerSettings:
        """Read the ``MEDPLIB_*`` variables.

        Raises:
            UserInputError: a value is malformed (the message names the variable).
        """
        env = os.environ if env is None else env
        enabled = frozenset(_words(env.get(ENV_ENABLE, "")))
        unknown = sorted(enabled - set(FEATURES))
        if unknown:
            raise UserInputError(
                f"{ENV_ENABLE}: unknown feature(s) {unknown}; choose from {sorted(FEATURES)}"
            )
        token = env.get(ENV_AUTH_TOKEN) or None
        if token is None and env.get(ENV_AUTH_TOKEN_FILE):
            token = read_token_file(env[ENV_AUTH_TOKEN_FILE])
        elif token is not None:
            token = _check_token(token.strip(), ENV_AUTH_TOKEN)
        origins = tuple(o.rstrip("/") for o in _words(env.get(ENV_CORS_ORIGINS, "")))
        for origin in origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise UserInputError(
                    f"{ENV_CORS_ORIGINS}: {origin!r} is not an origin like https://viewer:3000"
                )
        max_mb = parse_int(env.get(ENV_MAX_UPLOAD_MB, DEFAULT_MAX_UPLOAD_MB), ENV_MAX_UPLOAD_MB, minimum=1)
        return cls(
            auth_token=token,
            cors_origins=origins,
            allowed_hosts=tuple(h.lower() for h in _words(env.get(ENV_ALLOWED_HOSTS, ""))),
            enabled=enabled,
            max_upload_bytes=max_mb * 2**20,
            insecure_no_auth=parse_bool(env.get(ENV_INSECURE_NO_AUTH, "false"), ENV_INSECURE_NO_AUTH),
        )

    def check_bind(self, host: str) -> None:
        """Refuse to serve a non-loopback address without a token (unless :attr:`insecure_no_auth`).

        Raises:
            UserInputError: naming the host and the two ways out.
        """
        if self.auth_token or self.insecure_no_auth or is_loopback(host):
            return
        raise UserInputError(
            f"refusing to listen on {host!r} without authentication: anyone on the network could read the "
            f"studies. Give --auth-token-file FILE (or set {ENV_AUTH_TOKEN_FILE} / {ENV_AUTH_TOKEN}), or bind "
            f"--host 127.0.0.1; --insecure-no-auth ({ENV_INSECURE_NO_AUTH}=true) only behind a proxy that "
            "authenticates"
        )

    def refusal(self, feature: Feature) -> str:
        """The message a request to a feature that is off gets."""
        return (
            f"{feature.what}; it is turned off on this server (start medplib serve with --enable "
            f"{feature.name}, or set {ENV_ENABLE}={feature.name})"
        )


def read_token_file(path: str | Path) -> str:
    """The token in ``path`` (surrounding whitespace removed).

    Raises:
        UserInputError: the file is missing, unreadable or holds a token that is too short.
    """
    path = Path(path)
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise UserInputError(f"auth token file {str(path)!r} cannot be read: {err}") from err
    return _check_token(token, f"auth token file {str(path)!r}")


def _check_token(token: str, source: str) -> str:
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise UserInputError(
            f"{source}: the token must be at least {MIN_TOKEN_CHARS} characters without spaces "
            '(e.g. python -c "import secrets; print(secrets.token_urlsafe(32))")'
        )
    return token


def _words(value: str) -> list[str]:
    return [w.strip() for w in value.replace(";", ",").split(",") if w.strip()]


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bound_host(argv: list[str]) -> str:
    """The address the server in this process listens on, from its command line: ``--host`` of
    ``monailabel start_server`` (default 0.0.0.0) or of uvicorn (default 127.0.0.1)."""
    parser = argparse.ArgumentParser(add_help=False)
    default = "0.0.0.0" if "start_server" in argv else "127.0.0.1"
    parser.add_argument("--host", default=default)
    known, _ = parser.parse_known_args(argv)
    return str(known.host)


def state_dir(studies: str, env: Mapping[str, str] | None = None) -> Path:
    """Where the server keeps its own files: ``<studies>/.medplib`` for a local studies folder (uploads are
    staged on the studies' file system, so a save is one atomic rename); for a DICOMweb datastore
    ``~/.cache/monai-medplib/server``. ``MEDPLIB_STATE_DIR`` overrides both."""
    env = os.environ if env is None else env
    if env.get(ENV_STATE_DIR):
        return Path(env[ENV_STATE_DIR])
    if str(studies).startswith(("http://", "https://")):
        return Path.home() / ".cache" / "monai-medplib" / "server"
    return Path(studies) / STATE_FOLDER
