"""The server's gate, an ASGI middleware in front of every route (ours and MONAI Label's):

1. ``Host`` allow-list while the server is unauthenticated on loopback (a web page cannot reach it by
   re-pointing a DNS name at 127.0.0.1);
2. the bearer token (``Authorization: Bearer ...`` from 3D Slicer and scripts, or the ``medplib_token``
   cookie set by ``/auth/login`` for OHIF), compared in constant time; it is removed from the request once
   checked, so MONAI Label's DICOMweb proxy never forwards it to the PACS;
3. operational routes that are off (``settings.FEATURES``) answered 403 with how to turn them on;
4. the request body size, from ``Content-Length`` and counted as it streams;
5. requests that change something (not GET / HEAD / OPTIONS) sent by a web page of another site (its ``Origin``,
   or ``Sec-Fetch-Site: cross-site``) unless that origin is one the operator allowed: a browser sends a
   multipart POST to 127.0.0.1 without asking, with the user's cookie, so any page could otherwise overwrite a
   label. 3D Slicer and scripts send no ``Origin``; OHIF served by this server is same-origin.
"""

from __future__ import annotations

import hmac
from typing import Any

from .settings import AUTH_COOKIE, FEATURES, ServerSettings, is_loopback

# Reachable without a token: what a client needs to learn that auth is on and to log in.
OPEN_PATHS = frozenset({"/auth", "/auth/", "/auth/token", "/auth/login"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# MONAI Label routes whose body is a few JSON fields (Slicer's next-sample request): capped small whatever
# --max-upload-mb says; what they get is stored in the datastore file and logged
SMALL_BODY_PREFIXES = ("/activelearning",)
SMALL_BODY_BYTES = 64 * 1024


class _BodyTooLarge(Exception):
    pass


class RequestGuard:
    """ASGI middleware enforcing ``settings`` (see the module docstring).

    Args:
        app: the wrapped ASGI app.
        settings: the operator's choices.
        bind_host: the address the server listens on (decides whether the Host check applies).
        api_prefix: MONAI Label's API prefix (``MONAI_LABEL_API_STR``), stripped before matching routes.
    """

    def __init__(
        self,
        app: Any,
        settings: ServerSettings,
        bind_host: str,
        api_prefix: str = "",
        origins: tuple[str, ...] | None = None,
    ) -> None:
        self.app = app
        self.settings = settings
        # the browser origins allowed to call (ours and MONAI Label's MONAI_LABEL_CORS_ORIGINS)
        self.origins = frozenset(settings.cors_origins if origins is None else origins)
        self.api_prefix = api_prefix.rstrip("/")
        self.check_host = bool(settings.allowed_hosts) or (not settings.auth_token and is_loopback(bind_host))
        hosts = {"localhost", "127.0.0.1", "::1", *settings.allowed_hosts}
        if bind_host not in ("0.0.0.0", "::", ""):
            hosts.add(bind_host.lower().strip("[]"))
        self.hosts = frozenset(hosts)
        self.token = settings.auth_token.encode() if settings.auth_token else None
        self.off = [
            (prefix, methods, FEATURES[name])
            for name in sorted(set(FEATURES) - settings.enabled)
            for prefix, methods in FEATURES[name].routes
        ]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        path = scope.get("path", "")
        if self.api_prefix and path.startswith(self.api_prefix):
            path = path[len(self.api_prefix) :] or "/"
        method = scope["method"]

        if self.check_host and _host_name(headers.get("host", "")) not in self.hosts:
            await _answer(scope, receive, send, 400, f"host {headers.get('host', '')!r} is not served here")
            return
        if method not in SAFE_METHODS and not self._same_site_or_allowed(headers):
            await _answer(
                scope,
                receive,
                send,
                403,
                f"a page of another site ({headers.get('origin') or 'cross-site'}) may not change this server; "
                "allow its origin with --cors-origin if it is your viewer",
            )
            return
        if self.token is not None and path not in OPEN_PATHS:
            if not self._authorised(headers):
                await _answer(
                    scope,
                    receive,
                    send,
                    401,
                    "this server needs its access token: send 'Authorization: Bearer <token>' "
                    "(3D Slicer: any user name, the token as password; a browser: open /auth/login)",
                    {"www-authenticate": "Bearer"},
                )
                return
            scope = _without_credentials(scope)
        for prefix, methods, feature in self.off:
            if (path == prefix or path.startswith(prefix + "/")) and (methods is None or method in methods):
                await _answer(scope, receive, send, 403, self.settings.refusal(feature))
                return

        limit, whose = self.settings.max_upload_bytes, "the server's --max-upload-mb"
        if path.startswith(SMALL_BODY_PREFIXES) and limit > SMALL_BODY_BYTES:
            limit, whose = SMALL_BODY_BYTES, f"the limit of {path.split('/')[1]} requests"
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _answer(scope, receive, send, 413, too_large(limit, whose))
            return
        received = 0
        started = False

        async def counted_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge
            return message

        async def watched_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except _BodyTooLarge:
            if started:
                raise
            await _answer(scope, receive, send, 413, too_large(limit, whose))

    def _same_site_or_allowed(self, headers: Any) -> bool:
        origin = headers.get("origin", "").rstrip("/")
        if not origin:  # not from a page (Slicer, curl), or a browser that says where from without Origin
            return headers.get("sec-fetch-site", "") != "cross-site"
        if origin in self.origins or "*" in self.origins:
            return True
        scheme, _, authority = origin.partition("://")
        if scheme not in ("http", "https"):
            return False
        # the page's own server: as the request names it, as a proxy forwarded it, or a name the operator listed
        served = {headers.get("host", "").lower(), headers.get("x-forwarded-host", "").lower()}
        return authority.lower() in served or _host_name(authority) in self.settings.allowed_hosts

    def _authorised(self, headers: Any) -> bool:
        given = ""
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            given = value.strip()
        if not given:
            given = _cookie(headers.get("cookie", ""), AUTH_COOKIE)
        return bool(given) and hmac.compare_digest(given.encode(), self.token)


def too_large(limit: int, whose: str = "the server's --max-upload-mb") -> str:
    """The 413 message for a body over ``limit`` bytes."""
    size = f"{limit / 2**10:,.0f} KiB" if limit < 2**20 else f"{limit / 2**20:,.0f} MiB"
    return f"the request body is larger than {size} ({whose})"


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _cookie(header: str, name: str) -> str:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return ""


def _without_credentials(scope: dict) -> dict:
    """The scope without the Authorization header and the token cookie (other cookies stay)."""
    headers = []
    for key, value in scope["headers"]:
        if key == b"authorization":
            continue
        if key == b"cookie":
            kept = [
                c for c in value.decode("latin-1").split(";") if c.strip().partition("=")[0] != AUTH_COOKIE
            ]
            if not any(c.strip() for c in kept):
                continue
            value = ";".join(kept).strip().encode("latin-1")
        headers.append((key, value))
    return {**scope, "headers": headers}


async def _answer(
    scope: dict, receive: Any, send: Any, status: int, message: str, headers: dict | None = None
) -> None:
    from starlette.responses import JSONResponse

    await JSONResponse({"detail": message}, status_code=status, headers=headers)(scope, receive, send)
