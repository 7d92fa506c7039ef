"""``medplib serve`` next to patient data, tried as an attacker and a careless user would (issue 14).

A real server on 127.0.0.1 (the shipped demo model; a studies folder with a real LiTS CT slab), started with an
access token, ``archives`` enabled (so uploaded archives are really checked) and a 64 MiB upload limit. Its
``TMPDIR`` and ``HOME`` lie inside the test's temporary root, so a file the server writes anywhere but its
studies folder shows up in the snapshot of that root.

Every numbered case of the issue is sent as a request (``CASES``; the number is the issue's). Each must be
answered 4xx with a message naming the problem; afterwards ``/info/`` answers, no file has appeared or changed
outside the studies folder, the studies folder holds the same files, the staging folder is empty and the
datastore listing is unchanged. Also: the token (401 without, 200 with; 3D Slicer's login), CORS for an
unknown origin, the defaults ``/info`` advertises, a plain ``monailabel start_server`` hardened the same way,
the refusal to listen on a non-loopback address without a token, and a server killed while it saves a large
label (the previous label survives and is served after a restart).
"""

from __future__ import annotations

import functools
import gzip
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from tests.support.app_clients import load_slicer_client_module, write_lits_slab
from tests.support.mlserver import MONAILabelServer
from tests.support.paths import REPO

pytestmark = pytest.mark.slow
TOKEN = "s3cret-token-for-tests-0123456789"
SHAPE = (128, 128, 12)  # the LiTS slab ct1
UPLOAD_LIMIT_MB = 64


# ---------------------------------------------------------------------------------------------- fixtures
@dataclass
class Site:
    """The temporary root: ``studies`` (the server's), ``outside`` (a target for escapes), ``tmp`` / ``home``
    (the server's TMPDIR and HOME)."""

    root: Path
    studies: Path
    outside: Path
    server: MONAILabelServer
    http: requests.Session

    @property
    def url(self) -> str:
        return self.server.url


def _snapshot(root: Path, skip: tuple[Path, ...]) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (but ``skip``) with its size and mtime."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in filenames:
            path = here / name
            if path in skip:
                continue
            stat = path.lstat()
            found[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def demo_dir():
    from monai_medplib.checkpoint import resolve_model_path

    return str(resolve_model_path("demo"))


@pytest.fixture(scope="module")
def site(tmp_path_factory, demo_dir):
    root = tmp_path_factory.mktemp("security")
    studies, outside = root / "studies", root / "outside"
    for folder in (studies, outside, root / "tmp", root / "home"):
        folder.mkdir()
    write_lits_slab(studies / "ct1.nii.gz")
    for mask in ("ct1_seg.nii.gz", "segmentation-1.nii", "liver_mask.nrrd"):  # masks are not studies
        (studies / mask).write_bytes(b"\0")
    (outside / "secret.nii.gz").write_bytes((studies / "ct1.nii.gz").read_bytes())  # a real image off-limits
    env = {
        "TMPDIR": str(root / "tmp"),
        "HOME": str(root / "home"),
        "MEDPLIB_AUTH_TOKEN": TOKEN,
        "MEDPLIB_ENABLE": "archives",
        "MEDPLIB_MAX_UPLOAD_MB": str(UPLOAD_LIMIT_MB),
    }
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with MONAILabelServer(studies, model=demo_dir, env=env, log_path=log, auth_token=TOKEN) as server:
        http_session = requests.Session()
        http_session.headers["Authorization"] = f"Bearer {TOKEN}"
        yield Site(root, studies, outside, server, http_session)


def _state(site: Site) -> dict:
    state_folder = site.studies / ".medplib"
    return {
        "outside the studies": _snapshot(site.root, (site.studies,)),
        "the studies": _snapshot(site.studies, (state_folder, site.studies / ".lock")),
        "staging": sorted(p.name for p in (state_folder / "staging").iterdir()),
        "listing": site.http.get(site.url + "/datastore/", params={"output": "all"}, timeout=30).json(),
    }


# ------------------------------------------------------------------------------------------ request makers
def _nifti_bytes(array: np.ndarray, compress: bool = True) -> bytes:
    image = nib.Nifti1Image(array, np.eye(4))
    raw = image.to_bytes()
    return gzip.compress(raw, compresslevel=1) if compress else raw


def _tar(members: list[tuple[str, bytes | None, str | None]]) -> bytes:
    """A tar with (name, data, symlink target) members."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data, link in members:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _zip(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buffer.getvalue()


def _data(value: bytes | Callable[[], bytes]) -> bytes:
    """Payloads are bytes, or a function making them when the case runs (large ones)."""
    return value() if callable(value) else value


def infer(
    model: str, params: dict | str | bytes, image: str | None = "ct1", files: dict | None = None, **query
):
    raw = params if isinstance(params, str | bytes) else json.dumps(params)
    query = {**({"image": image} if image else {}), "output": "json", **query}

    def send(s: Site) -> requests.Response:
        form = {"params": (None, raw), **{k: (name, _data(v)) for k, (name, v) in (files or {}).items()}}
        return s.http.post(f"{s.url}/infer/{model}", params=query, files=form, timeout=120)

    return send


def put_image(name: str, data: bytes | Callable[[], bytes], image: str | None = None):
    query = {"image": image} if image is not None else {}
    return lambda s: s.http.put(
        f"{s.url}/datastore/image", params=query, files={"file": (name, _data(data))}, timeout=60
    )


def put_label(name: str, data: bytes, image: str = "ct1", tag: str | None = None):
    query = {"image": image, **({"tag": tag} if tag else {})}
    return lambda s: s.http.put(
        f"{s.url}/datastore/label", params=query, files={"label": (name, data)}, timeout=60
    )


def put_session(name: str, data: bytes, uncompress: bool = True):
    query = {"uncompress": str(uncompress).lower()}
    return lambda s: s.http.put(f"{s.url}/session/", params=query, files={"files": (name, data)}, timeout=60)


def call(method: str, path: str, **kwargs):
    return lambda s: s.http.request(method, s.url + path, timeout=60, **kwargs)


def raw_get(path: str):
    """A GET sent byte for byte (no client-side normalisation of ``..``)."""

    def send(s: Site) -> requests.Response:
        conn = http.client.HTTPConnection(s.server.host, s.server.port, timeout=60)
        conn.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"})
        reply = conn.getresponse()
        fake = requests.Response()
        fake.status_code, fake._content = reply.status, reply.read()
        fake.headers.update(dict(reply.getheaders()))
        conn.close()
        return fake

    return send


@dataclass(frozen=True)
class Case:
    issue: int
    name: str
    send: Callable[[Site], requests.Response]
    status: int
    words: str


# Data for the cases, built once (small, in memory).
_RNG = np.random.default_rng(0)
_GOOD_LABEL = _nifti_bytes(np.zeros(SHAPE, np.uint8))
_WRONG_SHAPE_LABEL = _nifti_bytes(np.zeros((64, 64, 12), np.uint8))
_FRACTION_LABEL = _nifti_bytes(np.full(SHAPE, 0.5, np.float32))
_SMALL_CT = _nifti_bytes(_RNG.normal(0, 100, (32, 32, 6)).astype(np.int16))


@functools.cache
def _bomb() -> bytes:
    """~1 MB of gzip that expands past 2**28 voxels (the default max_voxels)."""
    return _nifti_bytes(np.zeros((512, 512, 1025), np.uint8))


def _too_big_body() -> bytes:
    return b"\0" * (UPLOAD_LIMIT_MB * 2**20 + 1)


_TEXT = b"patient notes, not an image\n" * 20
# headers that read their voxels from another file of the server (8 x 8 x 4 bytes of /etc/passwd)
_LEAK_MHA = b"ObjectType = Image\nNDims = 3\nDimSize = 8 8 4\nElementType = MET_UCHAR\nElementDataFile = /etc/passwd\n"
_LEAK_NRRD = b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 8 8 4\nencoding: raw\ndata file: /etc/passwd\n\n"
_TRUNCATED = _SMALL_CT[: len(_SMALL_CT) // 2]
_NAN_CT = _nifti_bytes(np.full((32, 32, 6), np.nan, np.float32))
# 3D Slicer's .seg.nrrd of overlapping segments: one layer per segment along a "list" axis (ITK: 2 components)
_LAYERED_SEG = (
    f"NRRD0004\ntype: uchar\ndimension: 4\nsizes: 2 {SHAPE[0]} {SHAPE[1]} {SHAPE[2]}\n"
    "kinds: list domain domain domain\nspace: left-posterior-superior\n"
    "space directions: none (1,0,0) (0,1,0) (0,0,1)\nencoding: raw\n\n"
).encode() + np.zeros((*SHAPE[::-1], 2), np.uint8).tobytes()
_HUGE_NUMBER = "9" * 5000  # past Python's 4,300-digit limit of int(text)

CASES = [
    # 1: image ids that would write outside the studies folder
    Case(
        1, "image id with ..", put_image("x.nii.gz", _SMALL_CT, image="../outside/x"), 400, "path separator"
    ),
    Case(1, "absolute image id", put_image("x.nii.gz", _SMALL_CT, image="/tmp/x"), 400, "path separator"),
    Case(1, "image id '..'", put_image("x.nii.gz", _SMALL_CT, image=".."), 400, "'..'"),
    Case(1, "upload named ..", put_image("..", _SMALL_CT), 400, "'..'"),
    Case(1, "upload path to a dot-file", put_image("../../.x.nii.gz", _SMALL_CT), 400, "must start with"),
    Case(1, "dot-file image id", put_image("x.nii.gz", _SMALL_CT, image=".hidden"), 400, "must start with"),
    # 2: label tags
    Case(2, "label tag with ..", put_label("l.nii.gz", _GOOD_LABEL, tag="../../x"), 400, "label tag"),
    Case(
        2,
        "infer label_tag with ..",
        infer("medplib_grounding", {"text": "liver", "slice": 2, "save_label": True, "label_tag": "../../x"}),
        400,
        "label tag",
    ),
    Case(
        2,
        "save_label not a boolean",
        infer("medplib_grounding", {"text": "liver", "slice": 2, "save_label": "maybe"}),
        400,
        "save_label",
    ),
    # 3: archives and session ids
    Case(3, "tar member ../", put_session("a.tar", _tar([("../escaped.txt", b"x", None)])), 400, "outside"),
    Case(
        3, "tar absolute member", put_session("a.tar", _tar([("/tmp/abs.txt", b"x", None)])), 400, "outside"
    ),
    Case(3, "tar symlink member", put_session("a.tar", _tar([("link", None, "/etc")])), 400, "link"),
    Case(3, "zip member ../", put_session("a.zip", _zip([("../escaped.txt", b"x")])), 400, "outside"),
    Case(3, "archive not an archive", put_session("a.nii.gz", _SMALL_CT), 400, "archive"),
    Case(3, "bogus session id in the path", raw_get("/session/%2e%2e"), 400, "session id"),
    Case(3, "bogus session id on delete", call("DELETE", "/session/not-a-uuid"), 400, "session id"),
    Case(
        3, "unknown session", call("GET", "/session/8c6b5f52-0c2e-11ef-9a4f-0242ac120002"), 404, "not found"
    ),
    # 4: params cannot name another file, model or session
    Case(4, "params image path", infer("medplib_vqa", {"image": "/etc/passwd"}), 400, "'image'"),
    Case(
        4, "params image outside", infer("medplib_vqa", {"image": "../outside/secret.nii.gz"}), 400, "'image'"
    ),
    Case(4, "params model", infer("medplib_vqa", {"model": "medplib_grounding"}), 400, "'model'"),
    Case(4, "params session", infer("medplib_vqa", {"session": {"image": "/etc/passwd"}}), 400, "'session'"),
    Case(4, "params result_dir", infer("medplib_vqa", {"result_dir": "/tmp"}), 400, "'result_dir'"),
    Case(
        4,
        "image id that is a server path",
        infer("medplib_vqa", {}, image="apps/medplib/main.py"),
        404,
        "not found",
    ),
    Case(4, "missing image id", infer("medplib_vqa", {}, image="nope"), 404, "not found"),
    Case(
        4,
        "wsi infer",
        call("POST", "/infer/wsi/medplib_vqa", json={"image": "/etc/passwd"}),
        403,
        "--enable wsi",
    ),
    Case(4, "wsi_v2 infer", call("POST", "/infer/wsi_v2/medplib_vqa", json={}), 403, "--enable wsi"),
    # 7: size limits before decompression
    Case(7, "bomb as image", put_image("bomb.nii.gz", _bomb), 413, "max_voxels"),
    Case(
        7,
        "bomb as infer upload",
        infer("medplib_vqa", {}, image=None, files={"file": ("bomb.nii.gz", _bomb)}),
        413,
        "max_voxels",
    ),
    Case(
        7,
        "bomb as infer upload with an OHIF .bin label",
        infer(
            "medplib_region_vqa",
            {"question": "q"},
            image=None,
            files={"file": ("bomb.nii.gz", _bomb), "label": ("scribble.bin", b"\1")},
        ),
        413,
        "max_voxels",
    ),
    Case(
        7,
        "body over the upload limit",
        put_image("big.nii", _too_big_body),
        413,
        "max-upload-mb",
    ),
    # 8: slice ranges
    Case(
        8,
        "slices 0-2000000",
        infer("medplib_grounding", {"text": "liver", "slices": "0-2000000"}),
        400,
        "past the last slice",
    ),
    # 9: garbage images and labels
    Case(9, "truncated image", put_image("trunc.nii.gz", _TRUNCATED), 400, "'trunc.nii.gz'"),
    Case(9, "text image", put_image("notes.nii.gz", _TEXT), 400, "'notes.nii.gz'"),
    Case(9, "empty image", put_image("empty.nii.gz", b""), 400, "empty"),
    Case(9, "random bytes image", put_image("noise.nrrd", _RNG.bytes(4096)), 400, "'noise.nrrd'"),
    Case(
        9,
        "2D picture as image",
        put_image("slice.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64),
        400,
        "not a volume file",
    ),
    Case(
        9, "wrong-shape label", put_label("l.nii.gz", _WRONG_SHAPE_LABEL), 400, "its image has 128 x 128 x 12"
    ),
    Case(9, "text label", put_label("l.nii.gz", _TEXT), 400, "'l.nii.gz'"),
    Case(9, "fractional label", put_label("l.nii.gz", _FRACTION_LABEL), 400, "whole numbers"),
    Case(
        9, "raw .bin label of the wrong size", put_label("label.bin", b"\1" * 100), 400, "one byte per voxel"
    ),
    # 10: operational routes are off
    Case(10, "logs", call("GET", "/logs/"), 403, "--enable logs"),
    Case(10, "gpu logs", call("GET", "/logs/gpu"), 403, "--enable logs"),
    Case(10, "batch infer", call("POST", "/batch/infer/anything", json={}), 403, "--enable batch"),
    Case(10, "train", call("POST", "/train/", json={}), 403, "--enable train"),
    Case(10, "scoring", call("POST", "/scoring/anything", json={}), 403, "--enable scoring"),
    Case(10, "reload", call("POST", "/reload"), 403, "--enable reload"),
    Case(10, "dataset zip", call("GET", "/datastore/dataset"), 403, "--enable dataset"),
    # 12: unreadable uploads to infer: a message, no traceback
    Case(
        12,
        "truncated infer upload",
        infer("medplib_vqa", {}, image=None, files={"file": ("t.nii.gz", _TRUNCATED)}),
        415,
        "'t.nii.gz'",
    ),
    Case(
        12,
        "empty infer upload",
        infer("medplib_vqa", {}, image=None, files={"file": ("e.nii.gz", b"")}),
        415,
        "empty",
    ),
    Case(
        12,
        "text infer upload",
        infer("medplib_vqa", {}, image=None, files={"file": ("n.nii.gz", _TEXT)}),
        415,
        "'n.nii.gz'",
    ),
    Case(
        12,
        "text named .png",
        infer("medplib_vqa", {}, image=None, files={"file": ("p.png", _TEXT)}),
        400,
        "3D volume",
    ),
    # 13: 4xx instead of 500
    Case(13, "NaN in roi", infer("medplib_region_vqa", '{"roi": [NaN, 5, 1, 9, 1, 2]}'), 400, "'roi'"),
    Case(13, "infinite roi", infer("medplib_region_vqa", '{"roi": [1, Infinity, 1, 9, 1, 2]}'), 400, "'roi'"),
    Case(
        13,
        "scribble label_info id not a number",
        infer(
            "medplib_region_vqa",
            {
                "question": "q",
                "label_info": [{"name": "tumour", "id": "tumour"}],
                "selected_label_name": "tumour",
            },
            files={"label": ("s.nii.gz", _GOOD_LABEL)},
        ),
        400,
        "'label_info' id of 'tumour' must be a whole number",
    ),
    Case(
        13,
        "image id that reads like a mask",
        put_image("x.nii.gz", _SMALL_CT, image="abdomen_label_study"),
        400,
        "reads like a mask file name",
    ),
    Case(13, "label for an unknown image", put_label("l.nii.gz", _GOOD_LABEL, image="nope"), 404, "'nope'"),
    Case(
        13, "delete an unknown image", call("DELETE", "/datastore/image", params={"id": "nope"}), 404, "nope"
    ),
    Case(
        13,
        "delete an unknown label",
        call("DELETE", "/datastore/label", params={"id": "ct1", "tag": "final"}),
        404,
        "not in the datastore",
    ),
    Case(
        13,
        "non-JSON image info",
        call("PUT", "/datastore/image/info", params={"image": "ct1"}, data={"info": "not json"}),
        400,
        "'info'",
    ),
    Case(
        13,
        "list as image info",
        call("PUT", "/datastore/image/info", params={"image": "ct1"}, data={"info": "[1]"}),
        400,
        "JSON object",
    ),
    Case(
        13,
        "info of an unknown image",
        call("PUT", "/datastore/image/info", params={"image": "nope"}, data={"info": "{}"}),
        404,
        "nope",
    ),
    Case(
        13,
        "non-JSON label info",
        call("PUT", "/datastore/label/info", params={"label": "ct1", "tag": "final"}, data={"info": "{"}),
        400,
        "'info'",
    ),
    Case(13, "ohif ..", raw_get("/ohif/.."), 400, "leaves the viewer"),
    Case(13, "ohif encoded ../..", raw_get("/ohif/%2e%2e/%2e%2e/etc/passwd"), 400, "leaves the viewer"),
    Case(
        13, "DICOMweb proxy on a local datastore", call("GET", "/proxy/dicom/qido/studies"), 400, "DICOMweb"
    ),
    Case(
        13,
        "PUT /model",
        call("PUT", "/model/medplib_vqa", files={"file": ("m.pt", b"x")}),
        403,
        "--enable models",
    ),
    # 16: clear messages
    Case(
        16, "slices a-b", infer("medplib_grounding", {"text": "liver", "slices": "a-b"}), 400, "not a range"
    ),
    Case(
        16,
        "slices 5-2",
        infer("medplib_grounding", {"text": "liver", "slices": "5-2"}),
        400,
        "runs backwards",
    ),
    Case(16, "text 12345", infer("medplib_grounding", {"text": 12345}), 400, "must be text"),
    Case(16, "question 12345", infer("medplib_vqa", {"question": 12345}), 400, "must be text"),
    Case(
        16,
        "JSON body instead of a form",
        call("POST", "/infer/medplib_vqa", params={"image": "ct1"}, json={"question": "q"}),
        415,
        "multipart/form-data",
    ),
    Case(
        16,
        "bogus session_id on infer",
        infer("medplib_vqa", {}, image=None, session_id="abc"),
        400,
        "not a session id",
    ),
    Case(16, "params not an object", infer("medplib_vqa", "[1, 2]"), 400, "JSON object"),
    Case(16, "unknown output", infer("medplib_vqa", {}, output="pdf"), 400, "output"),
    # 17: lenient parsing
    Case(
        17,
        "boolean coordinates",
        infer("medplib_region_vqa", {"foreground": [[True, 5, 2]]}),
        400,
        "three finite numbers",
    ),
    Case(17, "boolean in roi", infer("medplib_region_vqa", {"roi": [True, 9, 1, 9, 1, 2]}), 400, "'roi'"),
    Case(17, "fractional slice", infer("medplib_vqa", {"slice": 6.7}), 400, "whole number"),
    Case(
        17,
        "non-UTF-8 params",
        infer("medplib_vqa", '{"question": "caf\xe9"}'.encode("latin-1")),
        400,
        "not UTF-8",
    ),
    Case(
        17,
        "params model overriding the URL",
        infer("medplib_grounding", {"model": "medplib_vqa", "text": "liver"}),
        400,
        "'model'",
    ),
    Case(17, "unknown model", infer("medplib_nope", {}), 404, "unknown model"),
    # 18: found by review: detached voxel data, archives that hold no single volume
    Case(18, "MetaImage reading a server file", put_image("leak.mha", _LEAK_MHA), 400, "keeps its voxels in"),
    Case(18, "NRRD reading a server file", put_label("leak.nrrd", _LEAK_NRRD), 400, "keeps its voxels in"),
    Case(
        18,
        "session from a header reading a server file",
        put_session("leak.nrrd", _LEAK_NRRD, uncompress=False),
        400,
        "keeps its voxels in another file",
    ),
    Case(
        18,
        "infer upload reading a server file",
        infer("medplib_vqa", {}, image=None, files={"file": ("leak.mha", _LEAK_MHA)}),
        415,
        "keeps its voxels in another file",
    ),
    Case(
        18,
        "archive of two volumes",
        put_session("two.zip", _zip([("a.nii.gz", _SMALL_CT), ("b.nii.gz", _SMALL_CT)])),
        400,
        "holds no DICOM series: upload one volume file",
    ),
    Case(
        18,
        "archive member clashing with a folder",
        put_session("clash.zip", _zip([("a", b"x"), ("a/b.nii.gz", _SMALL_CT)])),
        400,
        "cannot be unpacked at 'a",
    ),
    # 18: found by the fourth review (500s before)
    Case(18, "all-NaN image upload", put_image("nan.nii.gz", _NAN_CT), 400, "no finite voxel"),
    Case(
        18,
        "all-NaN image sent with the request",
        infer("medplib_vqa", {"question": "q"}, image=None, files={"file": ("nan.nii.gz", _NAN_CT)}),
        400,
        "all NaN",
    ),
    Case(
        18,
        "5,000-digit number in params",
        infer("medplib_vqa", '{"question": "q", "slice": ' + _HUGE_NUMBER + "}"),
        400,
        "thousands of digits",
    ),
    Case(
        18, "5,000-digit slice", infer("medplib_vqa", {"question": "q", "slice": _HUGE_NUMBER}), 400, "whole"
    ),
    Case(
        18,
        "5,000-digit slice range",
        infer("medplib_grounding", {"text": "liver", "slices": "0-" + _HUGE_NUMBER}),
        400,
        "not a range",
    ),
    Case(
        18,
        "5,000-digit point",
        infer("medplib_region_vqa", {"question": "q", "foreground": f"[[{_HUGE_NUMBER}, 1, 1]]"}),
        400,
        "thousands of digits",
    ),
    Case(18, "superscript slice", infer("medplib_vqa", {"question": "q", "slice": "\u00b2"}), 400, "whole"),
    Case(18, "params nested 100,000 deep", infer("medplib_grounding", "[" * 100_000), 400, "nests too deep"),
    Case(
        18,
        "image info nested 100,000 deep",
        call("PUT", "/datastore/image/info", params={"image": "ct1"}, data={"info": "[" * 100_000}),
        400,
        "nests too deep",
    ),
    Case(
        18,
        "lone surrogate in a question",
        infer("medplib_vqa", '{"question": "\\ud800?"}'),
        400,
        "lone surrogate",
    ),
    Case(
        18,
        "lone surrogate in a segment name",
        infer("medplib_region_vqa", '{"question": "q", "foreground": [[5, 5, 3]], "label": "seg\\udc00"}'),
        400,
        "lone surrogate",
    ),
    Case(18, "layered .seg.nrrd label", put_label("multi.seg.nrrd", _LAYERED_SEG), 400, "values per voxel"),
    Case(
        18,
        "layered .seg.nrrd scribble",
        infer(
            "medplib_region_vqa",
            {"question": "q", "selected_label_name": "tumour"},
            files={"label": ("multi.seg.nrrd", _LAYERED_SEG)},
        ),
        415,
        "values per voxel",
    ),
    Case(
        18,
        "next-sample request of 100 KiB (stored in the datastore file and logged)",
        call("POST", "/activelearning/random", json={"client_id": "A" * 100 * 1024}),
        413,
        "the limit of activelearning requests",
    ),
    Case(18, "refine text 5", infer("medplib_refine", {"text": 5, "foreground": [[60, 60, 5]]}), 400, "text"),
    Case(
        18,
        "refine from two texts",
        infer("medplib_refine", {"text": "liver, spleen", "foreground": [[60, 60, 5]]}),
        400,
        "starts from one",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.issue}-{c.name}" for c in CASES])
def test_bad_request_is_4xx_with_a_message_and_changes_nothing(site, case):
    before = _state(site)
    reply = case.send(site)
    assert reply.status_code == case.status, reply.text[:500]
    detail = reply.json()["detail"]
    assert isinstance(detail, str) and case.words in detail, detail
    assert "Traceback" not in detail and ".medplib" not in detail and str(site.root) not in detail
    assert len(reply.content) < 2000  # a message, not a dump
    assert site.http.get(site.url + "/info/", timeout=30).status_code == 200
    after = _state(site)
    for what in before:
        assert after[what] == before[what], f"{what} changed"


def test_an_upload_the_client_abandons_leaves_no_file_and_no_traceback(site):
    """Every aborted Slicer upload logged a 60-line "Exception in ASGI application" (ClientDisconnect)."""
    before = _state(site)
    boundary = "medplibboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.nii.gz"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    with socket.create_connection((site.server.host, site.server.port), timeout=30) as conn:
        conn.sendall(
            (
                "PUT /datastore/image?image=abandoned HTTP/1.1\r\n"
                f"Host: {site.server.host}:{site.server.port}\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {4 * 2**20}\r\n\r\n"
            ).encode()
            + head
            + b"\0" * 2**20
        )
        time.sleep(1)  # the server is reading the body when the client goes
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _state(site) != before:
        time.sleep(0.5)
    assert _state(site) == before
    assert site.http.get(site.url + "/info/", timeout=30).status_code == 200
    log = site.server.log_text()
    assert "Exception in ASGI application" not in log and "ClientDisconnect" not in log


def test_infer_reads_no_file_named_in_params(site):
    # a scribble-like file in the server's temp folder, named as the segment: used as a name, never read
    decoy = site.root / "tmp" / "decoy.nii.gz"
    decoy.write_bytes(_nifti_bytes(np.ones(SHAPE, np.uint8)))
    try:
        params = {"label": str(decoy), "foreground": [[60, 50, 4]], "question": "What is this?"}
        reply = infer("medplib_region_vqa", params)(site)
        assert reply.status_code == 200, reply.text
        assert reply.json()["medplib"]["prompt"] == "points"
        assert reply.json()["label_names"] == {str(decoy): 1}
    finally:
        decoy.unlink()


def test_info_defaults_apply_to_a_request_without_them(site):
    info = site.http.get(site.url + "/info/", timeout=30).json()
    question = info["models"]["medplib_vqa"]["config"]["question"]
    reply = infer("medplib_vqa", {"slice": 3})(site)
    assert reply.status_code == 200, reply.text
    assert reply.json()["medplib"]["question"] == question
    text = info["models"]["medplib_grounding"]["config"]["text"]
    reply = infer("medplib_grounding", {"slice": 3})(site)
    assert reply.status_code == 200 and reply.json()["medplib"]["texts"] == [text]


def test_vqa_writes_no_label(site):
    before = _snapshot(site.root, ())
    reply = site.http.post(
        f"{site.url}/infer/medplib_vqa", params={"image": "ct1"}, files={"params": (None, "{}")}, timeout=60
    )
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("multipart/form-data")
    assert b'"answer"' in reply.content and b"filename=" not in reply.content
    reply = site.http.post(
        f"{site.url}/infer/medplib_vqa",
        params={"image": "ct1", "output": "image"},
        files={"params": (None, "{}")},
    )
    assert reply.status_code == 400 and "output=json" in reply.json()["detail"]
    assert _snapshot(site.root, ()).keys() == before.keys()


def test_token_is_enforced(site):
    bare = requests.get(site.url + "/info/", timeout=30)
    assert bare.status_code == 401 and "token" in bare.json()["detail"]
    assert bare.headers["www-authenticate"] == "Bearer"
    wrong = requests.get(site.url + "/info/", headers={"Authorization": "Bearer wrong-token"}, timeout=30)
    assert wrong.status_code == 401
    for path in ("/datastore/?output=all", "/datastore/image?image=ct1", "/docs", "/openapi.json"):
        assert requests.get(site.url + path, timeout=30).status_code == 401, path
    assert (
        requests.put(
            site.url + "/datastore/image?image=x", files={"file": ("x.nii.gz", _SMALL_CT)}
        ).status_code
        == 401
    )
    assert site.http.get(site.url + "/info/", timeout=30).status_code == 200
    assert (
        site.http.get(site.url + "/datastore/image", params={"image": "ct1"}, timeout=30).status_code == 200
    )
    # the browser path: /auth/login sets an HttpOnly SameSite=Strict cookie
    browser = requests.Session()
    reply = browser.post(site.url + "/auth/login", data={"token": TOKEN, "next": "/info/"}, timeout=30)
    assert reply.status_code == 200 and reply.json()["name"] == "MedPLIB"
    cookie = reply.history[0].headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert requests.post(site.url + "/auth/login", data={"token": "nope"}, timeout=30).status_code == 401


def test_slicer_login_with_the_token(site, tmp_path):
    client_module = load_slicer_client_module()
    client = client_module.MONAILabelClient(site.url, tmpdir=str(tmp_path))
    assert client.auth_enabled()
    with pytest.raises(client_module.MONAILabelClientException):
        client.info()
    with pytest.raises(client_module.MONAILabelClientException):
        client.auth_token("radiologist", "not-the-token")
    client.update_auth(client.auth_token("radiologist", TOKEN))  # what the module does after its login dialog
    assert client.auth_valid_token()
    assert client.info()["name"] == "MedPLIB"


def test_cors_is_not_reflected_for_an_unknown_origin(site):
    origin = "https://evil.example"
    preflight = requests.options(
        site.url + "/infer/medplib_vqa",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Authorization": f"Bearer {TOKEN}",
        },
        timeout=30,
    )
    assert "access-control-allow-origin" not in preflight.headers
    simple = site.http.get(site.url + "/info/", headers={"Origin": origin}, timeout=30)
    assert simple.status_code == 200
    assert "access-control-allow-origin" not in simple.headers
    assert "access-control-allow-credentials" not in simple.headers


def test_no_file_left_by_accepted_requests(site):
    """A run of accepted requests (an upload, a label, a session, every task) leaves the staging folder empty
    and nothing outside the studies folder."""
    before = _snapshot(site.root, (site.studies,))
    assert put_image("small.nii.gz", _SMALL_CT, image="small")(site).status_code == 200
    label = _nifti_bytes((np.arange(32 * 32 * 6).reshape(32, 32, 6) % 3).astype(np.uint8))
    assert put_label("small_label.nii.gz", label, image="small")(site).status_code == 200
    got = site.http.get(site.url + "/datastore/label", params={"label": "small", "tag": "final"}, timeout=30)
    assert got.status_code == 200 and gzip.decompress(got.content) == gzip.decompress(label)
    session = put_session("small.nii.gz", _SMALL_CT, uncompress=False)(site)
    assert session.status_code == 200, session.text
    session_id = session.json()["session_id"]
    assert "path" not in session.json()["session_info"]
    for model, params in (
        ("medplib_vqa", {}),
        ("medplib_grounding", {"slices": "1-2"}),
        ("medplib_region_vqa", {"foreground": [[10, 10, 2]]}),
        ("medplib_refine", {"foreground": [[10, 10, 2]]}),
    ):
        for output in ("json", "image", "all"):
            if model == "medplib_vqa" and output == "image":
                continue
            reply = infer(model, params, image=None, session_id=session_id, output=output)(site)
            assert reply.status_code == 200, (model, output, reply.text[:300])
    uploaded = infer("medplib_vqa", {}, image=None, files={"file": ("up.nii.gz", _SMALL_CT)})(site)
    assert uploaded.status_code == 200
    assert site.http.delete(f"{site.url}/session/{session_id}", timeout=30).status_code == 200
    assert (
        site.http.delete(f"{site.url}/datastore/image", params={"id": "small"}, timeout=30).status_code == 200
    )
    time.sleep(0.5)  # FileResponse cleanups run after the body is sent
    assert sorted((site.studies / ".medplib" / "staging").iterdir()) == []
    assert _snapshot(site.root, (site.studies,)) == before
    assert (
        "nvImageCodec" not in site.server.log_text()
    )  # once-per-read warning pair of MONAI's readers (issue 16.11)


def test_an_archive_wrapping_one_volume_or_a_series_in_a_folder_becomes_a_session(site, tmp_path):
    """What people zip: a folder holding one NIfTI, or a folder holding a DICOM series."""
    from monai_medplib.io import write_dicom_series

    write_dicom_series(_RNG.normal(0, 100, (32, 32, 6)), np.eye(4), tmp_path / "series")
    series = [(f"CT_0001/{p.name}", p.read_bytes()) for p in sorted((tmp_path / "series").iterdir())]
    for name, members in (("nifti.zip", [("case7/ct.nii.gz", _SMALL_CT)]), ("series.zip", series)):
        reply = put_session(name, _zip(members))(site)
        assert reply.status_code == 200, (name, reply.text[:300])
        session_id = reply.json()["session_id"]
        answer = infer("medplib_vqa", {}, image=None, session_id=session_id)(site)
        assert answer.status_code == 200, (name, answer.text[:300])
        assert site.http.delete(f"{site.url}/session/{session_id}", timeout=30).status_code == 200


def test_masks_in_the_studies_folder_are_not_studies(site):
    listing = site.http.get(site.url + "/datastore/", params={"output": "all"}, timeout=30).json()
    assert sorted(listing["objects"]) == ["ct1"]


# ------------------------------------------------------------------------- plain monailabel, bind refusal
def test_plain_monailabel_start_server_is_hardened_too(tmp_path, demo_dir):
    studies = tmp_path / "studies"
    studies.mkdir()
    write_lits_slab(studies / "ct1.nii.gz")
    (studies / "ct1_seg.nii.gz").write_bytes(_GOOD_LABEL)
    conf = {"models": "medplib_vqa", "preload": "false"}
    with MONAILabelServer(studies, model=demo_dir, launcher="monailabel", conf=conf) as server:
        url = server.url
        assert requests.get(url + "/logs/", timeout=30).status_code == 403
        reply = requests.put(
            url + "/datastore/image", params={"image": "../x"}, files={"file": ("x.nii.gz", _SMALL_CT)}
        )
        assert reply.status_code == 400 and "path separator" in reply.json()["detail"]
        reply = requests.put(
            url + "/session/", params={"uncompress": "true"}, files={"files": ("a.tar", _tar([]))}
        )
        assert reply.status_code == 403 and "--enable archives" in reply.json()["detail"]
        evil = requests.get(url + "/info/", headers={"Origin": "https://evil.example"}, timeout=30)
        assert evil.status_code == 200 and "access-control-allow-origin" not in evil.headers
        rebound = requests.get(url + "/info/", headers={"Host": "attacker.example"}, timeout=30)
        assert rebound.status_code == 400 and "host" in rebound.json()["detail"]
        assert sorted(requests.get(url + "/datastore/?output=all", timeout=30).json()["objects"]) == ["ct1"]
        assert requests.get(url + "/auth/", timeout=30).json() == {"enabled": False}
    assert "Traceback" not in server.log_text()


def _run_launcher(
    args: list[str], env: dict | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    environment.pop("MEDPLIB_AUTH_TOKEN", None)
    cmd = [sys.executable, "-m", "monai_medplib.adapters.monailabel.server", *args]
    return subprocess.run(cmd, cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout)


def test_refuses_a_network_address_without_a_token(tmp_path):
    done = _run_launcher(["--studies", str(tmp_path), "--host", "0.0.0.0", "--port", "1"])
    assert done.returncode == 2
    assert "refusing to listen on '0.0.0.0' without authentication" in done.stderr
    assert "--auth-token-file" in done.stderr and "Traceback" not in done.stderr
    short = tmp_path / "token.txt"
    short.write_text("short\n")
    done = _run_launcher(["--studies", str(tmp_path), "--auth-token-file", str(short)])
    assert done.returncode == 2 and "at least 16 characters" in done.stderr
    done = _run_launcher(["--studies", str(tmp_path), "--enable", "logs", "--cors-origin", "viewer:3000"])
    assert done.returncode == 2 and "viewer:3000" in done.stderr
    # a plain `monailabel start_server` listens on 0.0.0.0 by default: the app refuses to start
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    environment.pop("MEDPLIB_AUTH_TOKEN", None)
    plain = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(REPO / "apps" / "medplib")]
    plain += ["--studies", str(tmp_path), "--port", "1", "--conf", "preload", "false"]
    done = subprocess.run(plain, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "MedPLIB server not started: refusing to listen on '0.0.0.0'" in done.stdout + done.stderr


# -------------------------------------------------------------------------------- crash during a save
BIG = (512, 512, 160)  # a label of 40 MiB (uint8, uncompressed), written by the server in many blocks


def _big_label(value: int) -> bytes:
    label = np.zeros(BIG, np.uint8)
    label[100:400, 100:400, 20:140] = value
    return _nifti_bytes(label, compress=False)


def _label_bytes(url: str) -> bytes:
    reply = requests.get(url + "/datastore/label", params={"label": "big", "tag": "final"}, timeout=120)
    assert reply.status_code == 200, reply.text[:300]
    return reply.content


def _kill(server: MONAILabelServer) -> None:
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait(30)
    server.process = None


def test_label_survives_a_kill_during_its_save(tmp_path, demo_dir):
    studies = tmp_path / "studies"
    studies.mkdir()
    nib.save(nib.Nifti1Image(np.zeros(BIG, np.int16), np.eye(4)), str(studies / "big.nii"))
    conf = {"models": "medplib_vqa", "preload": "false"}
    old, new = _big_label(1), _big_label(2)
    staging = studies / ".medplib" / "staging"

    def start() -> MONAILabelServer:
        return MONAILabelServer(studies, model=demo_dir, conf=conf, log_path=tmp_path / "server.log").start()

    server = start()
    try:
        assert put_label_to(server.url, old) == 200
        assert _label_bytes(server.url) == old

        # kill points: while the upload streams in, once it is in, and while the server places the file
        for kill_when in ("uploading", "uploaded", "placing"):
            sender = threading.Thread(
                target=lambda url=server.url: _quietly(put_label_to, url, new, slow=True)
            )
            sender.start()
            assert _wait_for(lambda when=kill_when: _staged_bytes(staging, when, len(new))), kill_when
            _kill(server)
            sender.join(60)
            assert (studies / "labels" / "final" / "big.nii").read_bytes() in (old, new)
            server = start()
            served = _label_bytes(server.url)
            if kill_when == "placing":
                assert served in (old, new), "a partial label was served after the restart"
            else:
                assert served == old, kill_when
            assert sorted(staging.iterdir()) == []  # what the killed server staged was swept at the start
            assert sorted(p.name for p in (studies / "labels" / "final").iterdir()) == ["big.nii"]
    finally:
        if server.process is not None:
            server.stop()


def put_label_to(url: str, data: bytes, slow: bool = False) -> int:
    """PUT ``data`` as the final label of ``big``; with ``slow`` the first half goes out in slow pieces (time to
    kill the server mid-upload). Returns the status."""
    boundary = "medplibtestboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="label"; filename="big.nii"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    body = head + data + f"\r\n--{boundary}--\r\n".encode()
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    conn.putrequest("PUT", "/datastore/label?image=big&tag=final")
    conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders()
    for start in range(0, len(body), 2**20):
        conn.send(body[start : start + 2**20])
        if slow and start < len(body) // 2:
            time.sleep(0.05)
    status = conn.getresponse().status
    conn.close()
    return status


def _wait_for(condition: Callable[[], bool], timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.001)
    return False


def _quietly(send: Callable, *args, **kwargs) -> None:
    try:
        send(*args, **kwargs)
    except OSError:
        pass  # the server was killed under it


def _staged_bytes(staging: Path, when: str, full: int) -> bool:
    """Whether the upload reached ``when``: part of the label staged, all of it, or its copy being placed
    (a second staging folder holding the destination's name)."""
    if not staging.is_dir():
        return False
    files = [p for folder in staging.iterdir() if folder.is_dir() for p in folder.iterdir() if p.is_file()]
    sizes = [p.stat().st_size for p in files]
    if when == "uploading":
        return any(0 < s < full // 2 for s in sizes)
    if when == "uploaded":
        return any(s == full for s in sizes)
    return len(files) >= 2
