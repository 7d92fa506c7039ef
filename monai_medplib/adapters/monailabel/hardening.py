"""Turn MONAI Label's FastAPI app into one that is safe next to patient data, without editing MONAI Label.

:func:`harden` (idempotent) runs when ``medplib serve`` builds the app and again from the MedPLIB app's
``__init__``, so a plain ``monailabel start_server --app apps/medplib`` is hardened too:

* stock routers that start processes, serve logs or move model files are removed unless enabled
  (``settings.FEATURES``), as is ``POST /reload``; on a local studies folder the DICOMweb proxy is replaced by
  a message;
* our routes (:mod:`.infer`, :mod:`.routes`, :mod:`.auth`) go in front of the stock ones they replace;
* exception handlers answer user errors with 4xx (:mod:`.errors`);
* MONAI Label's CORS middleware (any origin, with credentials) is removed; origins the operator lists get a
  credential-less CORS policy; :class:`.guard.RequestGuard` goes in front of everything;
* loggers that would record request texts or repeat a warning on every request are quietened.

Middleware is read when the app handles its first request; a plain ``monailabel start_server`` has done that
(its start-up) before our app exists, so the middleware stack is reset and rebuilt on the next request.
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings
from typing import Any

from ...user_input import UserInputError
from .errors import install_exception_handlers
from .guard import RequestGuard
from .settings import ServerSettings, bound_host, state_dir
from .uploads import Staging

logger = logging.getLogger(__name__)

_FLAG = "medplib_hardened"
# MONAI Label endpoint modules whose routers are removed unless their feature is enabled.
STOCK_ROUTERS = {
    "monailabel.endpoints.logs": "logs",
    "monailabel.endpoints.batch_infer": "batch",
    "monailabel.endpoints.train": "train",
    "monailabel.endpoints.scoring": "scoring",
    "monailabel.endpoints.model": "models",
    "monailabel.endpoints.wsi_infer": "wsi",
}
PROXY_MODULE = "monailabel.endpoints.proxy"
# Loggers that record request parameters (free text, possibly patient details) at INFO, or warn per request.
QUIET_LOGGERS = {
    "monailabel.endpoints.datastore": logging.WARNING,
    "monailabel.endpoints.infer": logging.WARNING,
    "monailabel.datastore.local": logging.WARNING,
    "monailabel.utils.async_tasks": logging.WARNING,
    "monailabel.utils.sessions": logging.WARNING,
    "monailabel.endpoints.activelearning": logging.WARNING,  # logs the request body and the sample's path
    "monailabel.tasks.activelearning.first": logging.WARNING,
    "monailabel.tasks.activelearning.random": logging.WARNING,
    "monai.data.nvimgcodec_pydicom_plugin": logging.ERROR,  # "nvImageCodec is not available" on every read
}
CORS_METHODS = ["GET", "POST", "PUT", "DELETE"]
CORS_HEADERS = ["Authorization", "Content-Type"]


def is_remote(studies: str) -> bool:
    return str(studies).startswith(("http://", "https://"))


def harden(app: Any, settings: ServerSettings | None = None) -> None:
    """Harden MONAI Label's FastAPI ``app`` (see the module docstring); a second call does nothing.

    Raises:
        UserInputError: a ``MEDPLIB_*`` setting is malformed, or the server listens on a non-loopback address
            without a token.
    """
    if getattr(app.state, _FLAG, False):
        return
    from monailabel.config import settings as ml_settings

    settings = settings or ServerSettings.from_env()
    settings.check_bind(bound_host(sys.argv))
    studies = str(ml_settings.MONAI_LABEL_STUDIES or "")
    remote = is_remote(studies)

    _remove_stock_routes(app, settings, remote)
    _put_first(app, _our_routers(remote), ml_settings.MONAI_LABEL_API_STR)
    install_exception_handlers(app)
    _replace_middleware(app, settings, [str(o) for o in ml_settings.MONAI_LABEL_CORS_ORIGINS or []])
    quiet_loggers()

    staging = Staging(state_dir(studies) / "staging")
    staging.sweep()
    staging.root.mkdir(parents=True, exist_ok=True)
    app.state.medplib_settings = settings
    app.state.medplib_staging = staging
    app.middleware_stack = None  # rebuilt with our middleware on the next request
    setattr(app.state, _FLAG, True)
    off = sorted(set(_features()) - settings.enabled)
    auth = "token required" if settings.auth_token else "no token (loopback only)"
    logger.info(f"MedPLIB server hardening: {auth}; off: {', '.join(off)}")


def _features() -> list[str]:
    from .settings import FEATURES

    return list(FEATURES)


def _router_modules(settings: ServerSettings, remote: bool) -> set[str]:
    dropped = {module for module, feature in STOCK_ROUTERS.items() if feature not in settings.enabled}
    if not remote:
        dropped.add(PROXY_MODULE)
    return dropped


def _remove_stock_routes(app: Any, settings: ServerSettings, remote: bool) -> None:
    """Drop whole stock routers, matched by identity (FastAPI >= 0.165 keeps included routers as one entry
    holding ``original_router``; older versions flatten them into routes whose endpoint names the module)."""
    modules = _router_modules(settings, remote)
    routers = {id(importlib.import_module(m).router) for m in modules}
    drop_reload = "reload" not in settings.enabled

    def dropped(route: Any) -> bool:
        if id(getattr(route, "original_router", None)) in routers:
            return True
        endpoint = getattr(route, "endpoint", None)
        module = getattr(endpoint, "__module__", "")
        if module in modules:
            return True
        return drop_reload and module == "monailabel.app" and getattr(route, "path", "") == "/reload"

    app.router.routes[:] = [r for r in app.router.routes if not dropped(r)]


def _our_routers(remote: bool) -> list[Any]:
    from .auth import auth_router
    from .infer import infer_router
    from .routes import datastore_router, local_proxy_router, ohif_router, session_router

    routers = [auth_router(), infer_router(), datastore_router(), session_router(), ohif_router()]
    if not remote:
        routers.append(local_proxy_router())
    return routers


def _put_first(app: Any, routers: list[Any], prefix: str) -> None:
    """Include ``routers`` ahead of every stock route: Starlette takes the first full match, so ours answer
    and the stock routes they replace stay registered but unreachable."""
    before = list(app.router.routes)
    for router in routers:
        app.include_router(router, prefix=prefix)
    added = [r for r in app.router.routes if not any(r is b for b in before)]
    app.router.routes[:] = added + before


def _replace_middleware(app: Any, settings: ServerSettings, monailabel_origins: list[str]) -> None:
    from fastapi.middleware import Middleware
    from fastapi.middleware.cors import CORSMiddleware
    from monailabel.config import settings as ml_settings

    kept = [m for m in app.user_middleware if getattr(m, "cls", None) is not CORSMiddleware]
    # MONAI Label's own setting is honoured, without the trailing "/" pydantic adds (browsers never send it)
    origins = list(dict.fromkeys([*settings.cors_origins, *(o.rstrip("/") for o in monailabel_origins)]))
    ours = []
    if origins:
        ours.append(
            Middleware(
                CORSMiddleware,
                allow_origins=origins,
                allow_credentials=False,
                allow_methods=CORS_METHODS,
                allow_headers=CORS_HEADERS,
            )
        )
    guard = Middleware(
        RequestGuard,
        settings=settings,
        bind_host=bound_host(sys.argv),
        api_prefix=ml_settings.MONAI_LABEL_API_STR,
        origins=tuple(origins),
    )
    app.user_middleware[:] = [*ours, guard, *kept]


def quiet_loggers() -> None:
    """Quieten :data:`QUIET_LOGGERS` and the nvImageCodec fallback warning (once per reader otherwise)."""
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin")


def prepare_app(studies: str) -> None:
    """What the MedPLIB app does first in ``__init__``: harden the running server (a plain ``monailabel
    start_server`` has no launcher of ours) and keep MONAI Label's sessions in the server's state folder
    instead of ``~/.cache/monailabel/sessions``."""
    from monailabel.config import settings as ml_settings

    module = sys.modules.get("monailabel.app")
    if module is not None and hasattr(module, "app"):
        try:
            harden(module.app)
        except UserInputError as err:  # the server does not start; say why in one line first
            logger.error(f"MedPLIB server not started: {err}")
            raise
    ml_settings.MONAI_LABEL_SESSION_PATH = str(state_dir(studies) / "sessions")
