"""One home for how the server answers a bad request: which exception becomes which HTTP status, always with
``{"detail": message}`` naming the problem, never a traceback or a bare 500 for an expected mistake."""

from __future__ import annotations

import json
import logging
from typing import Any

from ...user_input import UserInputError

logger = logging.getLogger(__name__)


class UpstreamError(Exception):
    """A server this one relies on (the DICOMweb PACS) failed or refused: answered 502 with the message."""


def rejected(status: int, message: str) -> Any:
    """The exception a route raises to answer ``status`` with ``message`` (FastAPI's ``HTTPException``)."""
    from fastapi import HTTPException

    return HTTPException(status_code=status, detail=message)


def status_of(err: BaseException) -> int:
    """The HTTP status of an expected error (MONAI Label's own exceptions by their kind)."""
    from monailabel.interfaces.exception import (
        ImageNotFoundException,
        LabelNotFoundException,
        MONAILabelError,
        MONAILabelException,
    )

    from ...io.readers import VolumeTooLarge

    if isinstance(err, ImageNotFoundException | LabelNotFoundException | FileNotFoundError):
        return 404
    if isinstance(err, VolumeTooLarge):
        return 413
    if isinstance(err, UpstreamError):
        return 502
    if isinstance(err, MONAILabelException):
        return 400 if err.error == MONAILabelError.INVALID_INPUT else 500
    return 400


def message_of(err: BaseException) -> str:
    msg = getattr(err, "msg", None)
    return str(msg if msg is not None else err)


def install_exception_handlers(app: Any) -> None:
    """Answer user errors raised anywhere in a route (ours or MONAI Label's) with 4xx and their message."""
    from fastapi.responses import JSONResponse
    from monailabel.interfaces.exception import MONAILabelException

    def handler(request: Any, err: Exception) -> Any:
        status = status_of(err)
        if status >= 500:
            logger.error(f"{request.method} {request.url.path}: {message_of(err)}")
        return JSONResponse({"detail": message_of(err)}, status_code=status)

    def bad_json(request: Any, err: Exception) -> Any:
        return JSONResponse({"detail": f"a form field is not valid JSON: {err}"}, status_code=400)

    app.add_exception_handler(UserInputError, handler)
    app.add_exception_handler(UpstreamError, handler)
    app.add_exception_handler(MONAILabelException, handler)
    app.add_exception_handler(json.JSONDecodeError, bad_json)
