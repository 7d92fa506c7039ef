"""``/auth/*``: how clients learn that the server wants its token, and how they present it.

3D Slicer's MONAI Label module asks ``GET /auth/``; when ``enabled`` it shows a login dialog and posts the user
name and password to ``POST /auth/token``. Here the password is the server's token (any user name), and the
answer hands the same token back as a bearer token, which Slicer then sends with every request. Browsers (the
OHIF viewer served under ``/ohif/``) cannot add a header, so ``/auth/login`` sets the token as an HttpOnly,
SameSite=Strict cookie. The token itself is checked by :mod:`.guard`; MONAI Label's own Keycloak login is not
used (it is not included while ``MONAI_LABEL_AUTH_ENABLE`` is off).
"""

import hmac
import html
from typing import Any

from .errors import rejected
from .settings import AUTH_COOKIE
from .uploads import SMALL_FORM_BYTES, read_form

LOGIN_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>MedPLIB server</title></head>
<body><form method="post" action="{action}"><p>{message}</p>
<label>Access token <input type="password" name="token" autofocus></label>
<input type="hidden" name="next" value="{next}"><button>Open</button></form></body></html>"""


def _token(request: Any) -> str | None:
    settings = getattr(request.app.state, "medplib_settings", None)
    return settings.auth_token if settings is not None else None


def _matches(given: str, token: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), token.encode())


def auth_router() -> Any:
    """The ``/auth`` routes (all reachable without a token; see :data:`.guard.OPEN_PATHS`)."""
    from fastapi import APIRouter, Request
    from fastapi.responses import HTMLResponse, RedirectResponse

    router = APIRouter(prefix="/auth", tags=["Auth"])

    @router.get("/", summary="Whether this server needs its access token")
    def enabled(request: Request) -> dict:
        return {"enabled": _token(request) is not None}

    @router.post("/token", summary="Trade the access token (as password, any user name) for a bearer token")
    async def token(request: Request) -> dict:
        expected = _token(request)
        if expected is None:
            raise rejected(400, "this server runs without an access token; no login is needed")
        form = await read_form(request, None, SMALL_FORM_BYTES, frozenset())
        if not _matches(form.fields.get("password", ""), expected):
            raise rejected(401, "wrong access token (give it as the password; the user name is not checked)")
        return {"access_token": expected, "token_type": "Bearer"}

    @router.get("/token/valid", summary="200 when the request carries the right token")
    def valid(request: Request) -> dict:
        return {}  # the guard already refused requests without it

    @router.get("/login", include_in_schema=False)
    def login_page(request: Request, next: str = "/ohif/") -> Any:
        message = "Give this server's access token." if _token(request) else "This server needs no token."
        page = LOGIN_PAGE.format(action="/auth/login", message=message, next=html.escape(_local(next)))
        return HTMLResponse(page)

    @router.post("/login", include_in_schema=False)
    async def login(request: Request) -> Any:
        expected = _token(request)
        form = await read_form(request, None, SMALL_FORM_BYTES, frozenset())
        if expected is not None and not _matches(form.fields.get("token", ""), expected):
            page = LOGIN_PAGE.format(action="/auth/login", message="Wrong token.", next="/ohif/")
            return HTMLResponse(page, status_code=401)
        reply = RedirectResponse(_local(form.fields.get("next", "/ohif/")), status_code=303)
        if expected is not None:
            reply.set_cookie(AUTH_COOKIE, expected, httponly=True, samesite="strict", path="/")
        return reply

    return router


def _local(target: str) -> str:
    """Only redirect within this server (no ``//host`` or ``https://...``)."""
    return (
        target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/ohif/"
    )
