"""Our versions of MONAI Label's routes that write files or resolve client paths; :mod:`.hardening` puts them in
front of the stock ones (which stay registered, unreachable).

Each reads its body with :func:`.uploads.read_form` into a staging folder of its own, does the blocking work in
FastAPI's thread pool, and removes the folder when the request ends, accepted or not.

* ``PUT /datastore/image`` (and its old alias ``PUT /datastore/``), ``PUT /datastore/label``: names checked,
  content checked, atomic saves (:class:`.datastore.GuardedLocalDatastore`);
* ``PUT /datastore/image/info``, ``PUT /datastore/label/info``, ``PUT /datastore/updatelabelinfo``: the info
  must be a JSON object;
* ``PUT /session/`` (archives unpacked only with ``--enable archives``, members checked first),
  ``GET`` / ``DELETE /session/{id}`` (ids are UUIDs);
* ``GET /datastore/dataset`` (``--enable dataset``): the zip is made in staging and removed after sending;
* ``GET /ohif/{path}``: files inside the bundled OHIF folder only;
* ``/proxy/...`` on a local studies folder: a message instead of a crash (the proxy is for DICOMweb).
"""

import logging
import os
from pathlib import Path
from typing import Any

from ...io.readers import DICOM_SUFFIX, VolumeLimits, probe_volume
from ...user_input import UserInputError, parse_bool, parse_int, parse_json
from . import names
from .archives import extract_archive, is_archive
from .datastore import volume_suffix
from .errors import rejected
from .settings import ServerSettings
from .uploads import Form, Staging, read_form

logger = logging.getLogger(__name__)

DEFAULT_LABEL_TAG = "final"  # what PUT /datastore/label saves under without ?tag= (MONAI Label's default)


def server_settings(request: Any) -> ServerSettings:
    return request.app.state.medplib_settings


def staging(request: Any) -> Staging:
    return request.app.state.medplib_staging


def volume_limits(instance: Any) -> VolumeLimits:
    """The app's size limits (``--conf max_voxels`` / ``max_volume_mb``), MONAI Label's defaults otherwise."""
    return getattr(instance, "volume_limits", None) or VolumeLimits()


def json_object(raw: str | None, field: str) -> dict[str, Any]:
    """A form field holding a JSON object (empty or missing: ``{}``)."""
    if raw is None or not raw.strip():
        return {}
    value = parse_json(raw, f"form field {field!r}")
    if not isinstance(value, dict):
        raise UserInputError(
            f"form field {field!r} must be a JSON object {{...}}, got {type(value).__name__}"
        )
    return value


async def read_request(request: Any, folder: Path | None, file_fields: frozenset[str]) -> Form:
    return await read_form(request, folder, server_settings(request).max_upload_bytes, file_fields)


def _required(form: Form, field: str, what: str) -> Any:
    part = form.file(field)
    if part is None:
        raise rejected(400, f"upload the {what} as the form field {field!r} (multipart/form-data)")
    return part


def datastore_router() -> Any:
    """The ``/datastore`` write routes and the dataset download."""
    from fastapi import APIRouter, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import FileResponse
    from monailabel.interfaces.utils.app import app_instance
    from starlette.background import BackgroundTask

    router = APIRouter(prefix="/datastore", tags=["Datastore"])

    @router.put("/", include_in_schema=False)
    @router.put("/image", summary="Upload a new image (checked, stored atomically)")
    async def add_image(request: Request) -> dict:
        image = request.query_params.get("image") or ""
        folder = staging(request).new()
        try:
            form = await read_request(request, folder, frozenset({"file"}))
            upload = _required(form, "file", "image")
            info = json_object(form.fields.get("params"), "params")
            store = app_instance().datastore()
            image_id = await run_in_threadpool(store.add_image, image, str(upload.path), info)
            return {"image": image_id}
        finally:
            staging(request).remove(folder)

    @router.put("/label", summary="Save a label of an image (checked against it, stored atomically)")
    async def save_label(request: Request) -> dict:
        image = request.query_params.get("image") or ""
        tag = request.query_params.get("tag") or DEFAULT_LABEL_TAG
        folder = staging(request).new()
        try:
            form = await read_request(request, folder, frozenset({"label"}))
            upload = _required(form, "label", "label")
            info = json_object(form.fields.get("params"), "params")
            if not image:
                raise rejected(400, "give the image the label belongs to (?image=ID)")
            instance = app_instance()
            label_id = await run_in_threadpool(
                instance.datastore().save_label, image, str(upload.path), tag, info
            )
            reply = instance.on_save_label(image, label_id) or {}
            return {**reply, "image": image, "label": label_id}
        finally:
            staging(request).remove(folder)

    async def _info_form(request: Request) -> dict[str, Any]:
        form = await read_request(request, None, frozenset())
        return json_object(form.fields.get("info"), "info")

    @router.put("/image/info", summary="Update an image's info (a JSON object)")
    async def put_image_info(request: Request, image: str) -> Any:
        info = await _info_form(request)
        return await run_in_threadpool(app_instance().datastore().update_image_info, image, info)

    @router.put("/label/info", summary="Update a label's info (a JSON object)")
    @router.put("/updatelabelinfo", include_in_schema=False)
    async def put_label_info(request: Request, label: str, tag: str) -> Any:
        info = await _info_form(request)
        return await run_in_threadpool(app_instance().datastore().update_label_info, label, tag, info)

    @router.get("/dataset", summary="Zip of the labelled images (--enable dataset)")
    def dataset(request: Request, limit_cases: int | None = None) -> Any:
        store = app_instance().datastore()
        if not hasattr(store, "staging"):
            raise rejected(400, "the dataset download needs a local studies folder")
        path = Path(store.get_dataset_archive(limit_cases))
        return FileResponse(
            path, filename="dataset.zip", background=BackgroundTask(Staging.remove, path.parent)
        )

    return router


def _session_json(info: Any) -> dict[str, Any]:
    """A session's description without server paths."""
    shown = info.to_json()
    for key in ("path", "image"):
        shown.pop(key, None)
    return shown


def session_router() -> Any:
    """``/session``: upload a volume (or a checked archive) once, infer on it many times."""
    from fastapi import APIRouter, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import FileResponse
    from monailabel.interfaces.utils.app import app_instance

    router = APIRouter(prefix="/session", tags=["Session"])

    def sessions() -> Any:
        found = app_instance().sessions()
        if found is None:
            raise rejected(406, "sessions are turned off on this server (MONAI_LABEL_SESSIONS)")
        return found

    def find(session_id: str) -> Any:
        info = sessions().get_session(names.session_id(session_id))
        if not info:
            raise rejected(404, f"session {session_id!r} not found or expired")
        return info

    @router.put("/", summary="Create a session from an uploaded volume (or, if enabled, an archive)")
    async def create(request: Request) -> dict:
        uncompress = parse_bool(request.query_params.get("uncompress", "false"), "uncompress")
        expiry = parse_int(request.query_params.get("expiry", "0"), "expiry", minimum=0)
        if uncompress and "archives" not in server_settings(request).enabled:
            from .settings import FEATURES

            raise rejected(403, server_settings(request).refusal(FEATURES["archives"]))
        folder = staging(request).new()
        try:
            received = folder / "received"
            received.mkdir()
            form = await read_request(request, received, frozenset({"files"}))
            files = form.files.get("files", [])
            if not files:
                raise rejected(400, "upload the volume as the form field 'files' (multipart/form-data)")
            limits = volume_limits(app_instance())
            source = await run_in_threadpool(_session_source, files, folder, uncompress, limits)
            session_id, info = await run_in_threadpool(sessions().add_session, str(source), expiry, False)
            return {"session_id": session_id, "session_info": _session_json(info)}
        finally:
            staging(request).remove(folder)

    @router.get("/{session_id}", summary="A session's description, or its image (?image=true)")
    def get(session_id: str, image: bool = False) -> Any:
        info = find(session_id)
        if image:
            if not os.path.isfile(info.image):
                raise rejected(
                    400, f"session {session_id!r} holds a series folder; only single files download"
                )
            return FileResponse(info.image, filename=os.path.basename(info.image))
        return _session_json(info)

    @router.delete("/{session_id}", summary="Remove a session")
    def remove(session_id: str) -> dict:
        info = find(session_id)
        sessions().remove_session(names.session_id(session_id))
        return _session_json(info)

    return router


def _session_source(files: list, folder: Path, uncompress: bool, limits: VolumeLimits) -> Path:
    """What becomes the session: the one uploaded volume, the folder of uploaded files (a DICOM series) or an
    unpacked archive; its header is checked against the size limits."""
    if uncompress:
        if len(files) != 1 or not is_archive(files[0].name):
            raise UserInputError("uncompress=true needs one uploaded archive (.zip, .tar, .tar.gz, ...)")
        unpacked = folder / "unpacked"
        unpacked.mkdir()
        extract_archive(files[0].path, unpacked, limits.max_bytes)
        source, what = _unpacked_source(unpacked), f"archive {files[0].name!r}"
    elif len(files) == 1:
        source, what = files[0].path, repr(files[0].name)
    else:
        source, what = files[0].path.parent, f"the upload of {len(files)} files"
    try:
        header = probe_volume(source)
    except UserInputError:
        raise
    except (FileNotFoundError, ValueError) as err:
        found = "no DICOM series" if isinstance(err, FileNotFoundError) else "several DICOM series"
        raise UserInputError(
            f"{what} holds {found}: upload one volume file (NIfTI, NRRD, MetaImage .mha), or the files of one "
            "DICOM series"
        ) from None
    limits.check(header, files[0].name if len(files) == 1 else "the uploaded series")
    return source


def _unpacked_source(folder: Path) -> Path:
    """An unpacked archive's volume: its one volume file, or the folder holding its files (a DICOM series),
    below any single top folder the archive wraps them in (a zipped series folder)."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    while len(entries) == 1 and entries[0].is_dir():
        folder = entries[0]
        entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    suffix = volume_suffix(entries[0].name) if len(entries) == 1 else None
    if suffix is not None and suffix.lower() != DICOM_SUFFIX:
        return entries[0]
    return folder


def ohif_router() -> Any:
    """``GET /ohif/{path}``: the bundled OHIF viewer's files; other paths get its index page (client routes)."""
    from fastapi import APIRouter
    from fastapi.responses import FileResponse
    from monailabel.endpoints import ohif

    root = Path(os.path.realpath(ohif.__file__)).parent / "static" / "ohif"
    router = APIRouter(prefix="/ohif", tags=["Others"])

    @router.get("/{path:path}", include_in_schema=False)
    def page(path: str) -> Any:
        parts = Path(path).parts
        if ".." in parts or path.startswith(("/", "\\")) or "\\" in path or "\x00" in path:
            raise rejected(400, f"/ohif/{path[:80]} leaves the viewer's folder")
        target = root / path if path else root / "index.html"
        if not target.is_file():
            target = root / "index.html"
        if not target.is_file():
            raise rejected(404, "the OHIF viewer is not installed with this MONAI Label")
        names.inside(target, root)
        return FileResponse(target)

    return router


def local_proxy_router() -> Any:
    """``/proxy/...`` when the studies are a local folder: there is no PACS to forward to."""
    from fastapi import APIRouter

    router = APIRouter(prefix="/proxy", tags=["Others"])

    @router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"], include_in_schema=False)
    def proxy(path: str) -> Any:
        raise rejected(
            400,
            "the DICOMweb proxy needs a DICOMweb datastore (--studies http://...); this server's studies "
            "are a local folder",
        )

    return router
