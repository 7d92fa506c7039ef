"""The server's gate and body reader (monai_medplib/adapters/monailabel/guard.py, uploads.py) on a small Starlette
app through its test client: tokens, closed routes, body limits, the Host check, strict form decoding."""

from __future__ import annotations

import json

import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from monai_medplib.adapters.monailabel.guard import RequestGuard
from monai_medplib.adapters.monailabel.settings import ServerSettings
from monai_medplib.adapters.monailabel.uploads import Staging, read_form

TOKEN = "0123456789abcdef-token"
LIMIT = 4096


def _as_json(request, err):
    return JSONResponse({"detail": err.detail}, status_code=err.status_code)


def _app(settings: ServerSettings, bind_host: str = "127.0.0.1", folder=None, origins=None) -> TestClient:
    seen = {}

    async def echo(request):
        seen["headers"] = dict(request.headers)
        form = await read_form(request, folder, settings.max_upload_bytes, frozenset({"file"}))
        files = {k: [(f.name, f.size, f.path.read_bytes()) for f in v] for k, v in form.files.items()}
        return JSONResponse(
            {"fields": form.fields, "files": {k: [list(x[:2]) for x in v] for k, v in files.items()}}
        )

    routes = [
        Route(p, echo, methods=["GET", "POST", "PUT"])
        for p in ("/info/", "/logs/", "/auth/", "/proxy/dicom/wado/x", "/infer/m")
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(RequestGuard, settings=settings, bind_host=bind_host, origins=origins)],
        exception_handlers={HTTPException: _as_json},  # what FastAPI does with an HTTPException
    )
    client = TestClient(app, base_url="http://127.0.0.1:8000", raise_server_exceptions=True)
    client.seen = seen
    return client


def test_token_from_header_or_cookie_and_never_passed_on():
    client = _app(ServerSettings(auth_token=TOKEN, max_upload_bytes=LIMIT))
    reply = client.get("/info/")
    assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in reply.json()["detail"]
    assert client.get("/info/", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/info/", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    assert (
        client.get("/info/", headers={"Authorization": f"Bearer {TOKEN}", "Cookie": "other=1"}).status_code
        == 200
    )
    assert "authorization" not in client.seen["headers"] and client.seen["headers"]["cookie"] == "other=1"
    assert client.get("/info/", headers={"Cookie": f"x=1; medplib_token={TOKEN}"}).status_code == 200
    assert client.seen["headers"]["cookie"] == "x=1"
    assert client.get("/auth/").status_code == 200  # how a client learns that a token is needed


def test_closed_routes_say_how_to_open_them():
    client = _app(ServerSettings(max_upload_bytes=LIMIT))
    reply = client.get("/logs/")
    assert reply.status_code == 403 and "--enable logs" in reply.json()["detail"]
    assert client.get("/proxy/dicom/wado/x").status_code == 200  # reading through the proxy stays on
    reply = client.post("/proxy/dicom/wado/x")
    assert reply.status_code == 403 and "--enable stow" in reply.json()["detail"]
    assert _app(ServerSettings(enabled=frozenset({"logs"}))).get("/logs/").status_code == 200


def test_body_limit_from_the_header_and_while_streaming(tmp_path):
    client = _app(ServerSettings(max_upload_bytes=LIMIT), folder=tmp_path)
    reply = client.post("/infer/m", files={"file": ("a.nii.gz", b"x" * (LIMIT + 1))})
    assert reply.status_code == 413 and "--max-upload-mb" in reply.json()["detail"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b"x" * 1000

    reply = client.post("/infer/m", content=chunks(), headers={"content-type": "application/octet-stream"})
    assert reply.status_code == 413


def test_host_check_on_an_unauthenticated_loopback_server():
    client = _app(ServerSettings())
    assert client.get("/info/").status_code == 200
    assert client.get("/info/", headers={"Host": "localhost:8000"}).status_code == 200
    reply = client.get("/info/", headers={"Host": "rebound.attacker.example"})
    assert reply.status_code == 400 and "not served here" in reply.json()["detail"]
    allowed = _app(ServerSettings(allowed_hosts=("ml.hospital.example",)))
    assert allowed.get("/info/", headers={"Host": "ml.hospital.example:8000"}).status_code == 200
    # with a token the token is the defence; names the operator did not list still reach the server
    assert (
        _app(ServerSettings(auth_token=TOKEN), bind_host="0.0.0.0")
        .get("/info/", headers={"Host": "10.0.0.5:8000", "Authorization": f"Bearer {TOKEN}"})
        .status_code
        == 200
    )


def test_multipart_files_go_to_the_folder_under_the_client_name(tmp_path):
    client = _app(ServerSettings(max_upload_bytes=2**20), folder=tmp_path)
    reply = client.post(
        "/infer/m",
        files={"params": (None, json.dumps({"q": "é"})), "file": ("/home/me/scan.nii.gz", b"abc")},
    )
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"fields": {"params": '{"q": "\\u00e9"}'}, "files": {"file": [["scan.nii.gz", 3]]}}
    assert (tmp_path / "scan.nii.gz").read_bytes() == b"abc"


@pytest.mark.parametrize(
    "kwargs, status, words",
    [
        (dict(files={"params": (None, '{"q": "caf\xe9"}'.encode("latin-1"))}), 400, "not UTF-8"),
        (dict(json={"question": "q"}), 415, "multipart/form-data"),
        (dict(content=b"<xml/>", headers={"content-type": "text/xml"}), 415, "text/xml"),
        (dict(files={"file": ("..", b"x")}), 400, "'..'"),
        (dict(files=[("file", ("a.nii", b"1")), ("file", ("a.nii", b"2"))]), 400, "two uploaded files"),
        (dict(content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data"}), 400, "boundary"),
        (dict(files={"params": (None, "x" * (2**20 + 10))}), 413, "larger than"),
    ],
)
def test_bad_bodies(tmp_path, kwargs, status, words):
    client = _app(ServerSettings(max_upload_bytes=4 * 2**20), folder=tmp_path)
    reply = client.post("/infer/m", **kwargs)
    assert reply.status_code == status and words in reply.json()["detail"], reply.text


def test_urlencoded_forms_are_strict_utf8(tmp_path):
    client = _app(ServerSettings(), folder=tmp_path)
    reply = client.post("/infer/m", data={"params": '{"q": "é"}'})
    assert reply.json()["fields"] == {"params": '{"q": "é"}'}
    reply = client.post(
        "/infer/m", content=b"params=caf%E9", headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert reply.status_code == 400 and "UTF-8" in reply.json()["detail"]


def test_staging_folders_go_and_leftovers_are_swept(tmp_path):
    staging = Staging(tmp_path / "staging")
    with staging.folder() as folder:
        (folder / "upload.nii.gz").write_bytes(b"x")
    assert list(staging.root.iterdir()) == []
    left = staging.new()
    (left / "half.nii").write_bytes(b"x")
    (staging.root / "stray").write_bytes(b"x")
    assert staging.sweep() == 2 and list(staging.root.iterdir()) == []


def test_viewers_the_operator_allowed_and_proxied_pages_may_write():
    """The cross-site check refused viewers allowed through MONAI_LABEL_CORS_ORIGINS, and a server's own pages behind
    a proxy that rewrites Host (the README's TLS set-up)."""
    viewer = "http://localhost:3000"
    client = _app(ServerSettings(), origins=(viewer,))
    assert client.post("/infer/m", headers={"Origin": viewer}).status_code != 403
    assert client.post("/infer/m", headers={"Origin": "https://evil.example"}).status_code == 403
    proxied = {"Origin": "https://medplib.hospital.example", "X-Forwarded-Host": "medplib.hospital.example"}
    assert client.post("/infer/m", headers=proxied).status_code != 403
    listed = _app(ServerSettings(allowed_hosts=("medplib.hospital.example",)))
    reply = listed.post(
        "/infer/m",
        headers={"Origin": "https://medplib.hospital.example", "Host": "medplib.hospital.example"},
    )
    assert reply.status_code != 403
