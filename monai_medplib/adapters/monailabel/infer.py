"""``POST /infer/{model}``, owned end to end (MONAI Label's ``run_inference`` / ``app.infer`` are not called).

What changes against the stock route:

* the image is the URL's: a datastore id (``?image=``), a session (``?session_id=``, a UUID) or the uploaded
  ``file``; request options cannot name another file, model or session (:data:`RESERVED_PARAMS` are refused),
  and the scribble ``label`` upload reaches the task as ``label_upload``, never a path from the options;
* the options are the task's ``/info`` defaults overlaid with the client's ``params`` (strict JSON object, UTF-8);
* uploads and results live in the request's staging folder and go when the reply is sent, also on errors;
* ``save_label`` is a real boolean and ``label_tag`` a checked tag; the label goes through the guarded datastore;
* the work runs in FastAPI's thread pool (one long inference does not block other routes), and every expected
  mistake is a 4xx with a message.
"""

import json
import logging
import os
from pathlib import Path
from typing import Any

from ...user_input import UserInputError, parse_bool
from . import names
from .errors import rejected
from .label_info import check_label_info
from .routes import json_object, read_request, staging
from .seg_export import SEG_FOLDER, nifti_to_dicom_seg

logger = logging.getLogger(__name__)

# Keys the route sets itself; a client sending one is refused rather than silently overridden.
RESERVED_PARAMS = frozenset(
    {"image", "model", "session", "session_id", "file", "result_dir", "label_upload", "description"}
)
OUTPUTS = ("image", "json", "all", "dicom_seg")
DEFAULT_LABEL_TAG = "original"  # MONAI Label's tag for labels saved by an infer


def infer_router() -> Any:
    from fastapi import APIRouter, Request
    from fastapi.concurrency import run_in_threadpool
    from monailabel.interfaces.utils.app import app_instance

    router = APIRouter(prefix="/infer", tags=["Infer"])

    @router.post(
        "/{model}", summary="Run a MedPLIB task on a datastore image, a session or an uploaded volume"
    )
    async def infer(request: Request, model: str) -> Any:
        instance = app_instance()
        tasks = getattr(instance, "_infers", {})
        if model not in tasks:
            raise rejected(404, f"unknown model {model!r}; available: {sorted(tasks)}")
        query = request.query_params
        output = query.get("output") or None
        if output is not None and output not in OUTPUTS:
            raise rejected(400, f"output {output!r} is not one of {list(OUTPUTS)}")
        folder = staging(request).new()
        keep = False
        try:
            form = await read_request(request, folder, frozenset({"file", "label"}))
            params = json_object(form.fields.get("params"), "params")
            reserved = sorted(RESERVED_PARAMS & set(params))
            if reserved:
                raise rejected(
                    400,
                    f"params {reserved} cannot be set by a request: the image comes from ?image=, "
                    "?session_id= or the uploaded file, and the model from the URL",
                )
            if "label" in params and not isinstance(params["label"], str):
                raise rejected(400, f"params 'label' is the segment name (text), got {params['label']!r}")
            save = parse_bool(params.get("save_label", False), "params 'save_label'")
            tag = names.label_tag(str(params.get("label_tag") or DEFAULT_LABEL_TAG))
            task = tasks[model]

            def work() -> tuple[Any, bool]:
                datastore = instance.datastore()
                image_id, image_path = _resolve_image(
                    instance, form, query.get("image") or "", query.get("session_id") or ""
                )
                if save and not image_id:
                    raise rejected(400, "save_label needs an image from the datastore (?image=ID)")
                if output == "dicom_seg":
                    _check_dicom_seg(datastore, params)
                req: dict[str, Any] = {**task.config(), **params, "model": model, "image": image_path}
                req["result_dir"] = str(folder)
                label = form.file("label")
                if label is not None:
                    limits = getattr(instance, "volume_limits", None)
                    req["label_upload"] = _label_path(label, image_path, folder, limits)
                result_path, result = task(req)
                if save and result_path:
                    datastore.save_label(image_id, result_path, tag, {"model": model, "params": result})
                return _reply(output, result_path, result, datastore, image_id, params, folder, model)

            # one worker-thread hop per request: a request that has its result never queues for a thread again
            # behind requests still waiting for their volume or the model
            reply, keep = await run_in_threadpool(work)
            return reply
        finally:
            if not keep:
                staging(request).remove(folder)

    return router


def _resolve_image(instance: Any, form: Any, image: str, session_id: str) -> tuple[str, str]:
    """``(datastore id or "", path)`` of the image the request is about."""
    upload = form.file("file")
    if upload is not None:
        return "", str(upload.path)
    if session_id:
        sessions = instance.sessions()
        info = sessions.get_session(names.session_id(session_id)) if sessions is not None else None
        if not info:
            raise rejected(404, f"session {session_id!r} not found or expired")
        return "", info.image
    if not image:
        raise rejected(400, "give an image id (?image=), a session_id or an uploaded file")
    try:
        uri = instance.datastore().get_image_uri(image)
    except UserInputError:
        raise
    except Exception as err:  # DICOMweb: an unknown series fails inside the download
        raise rejected(404, f"image {image!r} not found in the datastore ({type(err).__name__})") from err
    if not uri:
        raise rejected(404, f"image {image!r} not found in the datastore")
    return image, uri


def _label_path(label: Any, image_path: str, folder: Path, limits: Any) -> str:
    """The uploaded scribble label as a file the task can read (OHIF's raw ``.bin`` converted; the image's header
    checked against the app's ``limits`` before anything is decoded)."""
    from .datastore import BINARY_LABEL_SUFFIX, binary_label_to_nifti

    if label.name.lower().endswith(BINARY_LABEL_SUFFIX):
        return str(binary_label_to_nifti(image_path, label.path, folder, limits))
    return str(label.path)


def _check_dicom_seg(datastore: Any, params: dict[str, Any]) -> None:
    from monailabel.datastore.dicom import DICOMWebDatastore

    if not isinstance(datastore, DICOMWebDatastore):
        raise rejected(400, "output=dicom_seg needs a DICOMweb datastore (--studies URL)")
    if not params.get("label_info"):
        raise rejected(400, "output=dicom_seg needs 'label_info' in params")
    # before the model runs: a bad entry would fail the DICOM-SEG after it
    check_label_info(params["label_info"])


def _reply(
    output: str | None,
    result_path: str | None,
    result: dict[str, Any],
    datastore: Any,
    image_id: str,
    params: dict[str, Any],
    folder: Path,
    model: str,
) -> tuple[Any, bool]:
    """The response for ``output`` and whether ``folder`` must outlive the handler (a file still to send)."""
    from fastapi.responses import FileResponse, JSONResponse, Response
    from monailabel.utils.others.generic import get_mime_type
    from requests_toolbelt import MultipartEncoder
    from starlette.background import BackgroundTask

    from .uploads import Staging

    if output == "json":
        return JSONResponse(result), False
    if output == "image":
        if not result_path:
            raise rejected(400, f"{model} answers in JSON and returns no label; ask with output=json")
        cleanup = BackgroundTask(Staging.remove, folder)
        name = os.path.basename(result_path)
        return FileResponse(
            result_path, media_type=get_mime_type(name), filename=name, background=cleanup
        ), True
    if output == "dicom_seg":
        if not result_path:
            raise rejected(400, f"{model} returns no label to write as DICOM-SEG")
        seg = _dicom_seg(datastore, image_id, result_path, params["label_info"], folder)
        cleanup = BackgroundTask(Staging.remove, folder)
        return FileResponse(seg, media_type="application/dicom", filename=seg.name, background=cleanup), True
    # all / none: what 3D Slicer's client reads, a multipart reply with the JSON and the label (if any)
    fields: dict[str, Any] = {"params": (None, json.dumps(result), "application/json")}
    if result_path:
        name = os.path.basename(result_path)
        fields["image"] = (name, Path(result_path).read_bytes(), get_mime_type(name))
    encoded = MultipartEncoder(fields=fields)
    return Response(content=encoded.to_string(), media_type=encoded.content_type), False


def _dicom_seg(datastore: Any, image_id: str, label: str, label_info: Any, folder: Path) -> Path:
    """The result label as DICOM-SEG (:func:`.seg_export.nifti_to_dicom_seg`), in ``folder``."""
    uri = datastore.get_image_uri(image_id)
    series_dir = next((uri[: -len(s)] for s in (".nii.gz", ".nii", ".nrrd") if uri.endswith(s)), uri)
    token = SEG_FOLDER.set(folder)  # written into the request's staging folder, removed with it
    try:
        made = Path(nifti_to_dicom_seg(series_dir, label, label_info))
    finally:
        SEG_FOLDER.reset(token)
    target = folder / "result.dcm"
    made.replace(target)
    return target
