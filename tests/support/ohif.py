"""OHIF's prebuilt viewer served next to a DICOMweb server from one origin, for browser tests.

The viewer is the ``dist/`` folder of the npm package ``@ohif/app`` (no build needed), fetched once with
``npm pack`` into a cache folder (``scripts/install_e2e.sh`` does the same). :class:`OhifServer` serves that
folder, a generated ``app-config.js`` pointing OHIF at ``/dicom-web``, and passes ``/dicom-web/*`` through to
the real DICOMweb root (Orthanc), so the browser sees a single origin and needs no CORS.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
import urllib.parse
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

OHIF_VERSION = "3.13.2"
OHIF_PACKAGE = "@ohif/app"
DICOMWEB_PREFIX = "/dicom-web"
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
# Flags measured to work headless on these machines (see shared/reference/environment.md); SwiftShader gives
# the viewer a software WebGL context, which cornerstone3D needs to draw.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
)
# Headers a proxy must not pass on (RFC 9110 hop-by-hop) plus those it recomputes.
_HOP_HEADERS = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
}


def ohif_cache_dir() -> Path:
    """Where OHIF packages are unpacked: ``$MEDPLIB_OHIF_CACHE`` or ``~/.cache/monai-medplib/ohif``."""
    return Path(os.environ.get("MEDPLIB_OHIF_CACHE", Path.home() / ".cache" / "monai-medplib" / "ohif"))


def ohif_dist_dir(version: str = OHIF_VERSION) -> Path:
    """The viewer's ``dist/`` folder for ``version`` in the cache (it may not exist yet)."""
    return ohif_cache_dir() / version / "package" / "dist"


def find_chromium() -> str | None:
    """Path of the system Chromium, or None when none is installed."""
    for name in CHROMIUM_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def fetch_ohif_dist(version: str = OHIF_VERSION) -> Path:
    """Returns the cached viewer ``dist/``, fetching ``@ohif/app@version`` with ``npm pack`` if it is missing.

    Raises:
        FileNotFoundError: when npm is not installed and the viewer is not cached.
        RuntimeError: when ``npm pack`` fails or the package has no ``dist/index.html``.
    """
    dist = ohif_dist_dir(version)
    if (dist / "index.html").is_file():
        return dist
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError(f"OHIF {version} is not cached at {dist} and npm is not installed")
    target = dist.parent.parent
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [npm, "pack", "--silent", f"{OHIF_PACKAGE}@{version}"], cwd=tmp, capture_output=True, text=True
        )
        tarballs = list(Path(tmp).glob("*.tgz"))
        if result.returncode != 0 or len(tarballs) != 1:
            raise RuntimeError(f"npm pack {OHIF_PACKAGE}@{version} failed: {result.stderr[-2000:]}")
        with tarfile.open(tarballs[0]) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith("package/dist/")]
            archive.extractall(target, members=members, filter="data")
    if not (dist / "index.html").is_file():
        raise RuntimeError(f"{OHIF_PACKAGE}@{version} has no dist/index.html (looked in {dist})")
    return dist


def app_config_js(dicomweb_root: str = DICOMWEB_PREFIX, auto_load_segmentations: bool = True) -> str:
    """OHIF's ``app-config.js`` with one DICOMweb data source at ``dicomweb_root`` (Orthanc's conventions).

    Args:
        dicomweb_root: the DICOMweb root as the browser sees it (a path on the viewer's origin, or a URL).
        auto_load_segmentations: skip OHIF's "load this segmentation?" prompt, so opening a SEG series shows
            it at once over its CT (OHIF's ``disableConfirmationPrompts``).
    """
    data_source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "dicomweb",
        "configuration": {
            "friendlyName": "Orthanc (monai-medplib)",
            "name": "orthanc",
            "wadoUriRoot": dicomweb_root,
            "qidoRoot": dicomweb_root,
            "wadoRoot": dicomweb_root,
            "qidoSupportsIncludeField": False,
            "supportsReject": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": False,
            "dicomUploadEnabled": False,
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True},
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "disableConfirmationPrompts": auto_load_segmentations,
        "defaultDataSourceName": "dicomweb",
        "dataSources": [data_source],
    }
    return (
        "/** Generated by monai-medplib tests/support/ohif.py */\nwindow.config = "
        + json.dumps(config, indent=2)
        + ";\n"
    )


def viewer_url(base_url: str, study_instance_uid: str, series_instance_uids: list[str] | None = None) -> str:
    """The OHIF viewer URL that opens one study (optionally restricted to some of its series)."""
    query = {"StudyInstanceUIDs": study_instance_uid}
    if series_instance_uids:
        query["SeriesInstanceUIDs"] = ",".join(series_instance_uids)
    return f"{base_url}/viewer?{urllib.parse.urlencode(query)}"


class _OhifHandler(SimpleHTTPRequestHandler):
    """Static viewer files, the generated config, SPA routes and the ``/dicom-web`` pass-through."""

    server_version = "medplib-ohif"
    extensions_map = {
        **SimpleHTTPRequestHandler.extensions_map,
        ".wasm": "application/wasm",
        ".js": "text/javascript",
    }

    def __init__(
        self, *args, app_config: bytes, upstream: urllib.parse.SplitResult, directory: str, **kwargs
    ):
        self.app_config = app_config
        self.upstream = upstream
        super().__init__(*args, directory=directory, **kwargs)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base-class signature
        pass  # quiet: a viewer load makes hundreds of requests

    def end_headers(self) -> None:
        # Cross-origin isolation lets cornerstone use SharedArrayBuffer; everything is same-origin here.
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        super().end_headers()

    def _is_dicomweb(self) -> bool:
        path = urllib.parse.urlsplit(self.path).path
        return path == DICOMWEB_PREFIX or path.startswith(DICOMWEB_PREFIX + "/")

    def do_GET(self) -> None:
        if self._is_dicomweb():
            return self._proxy()
        path = urllib.parse.urlsplit(self.path).path
        if path == "/app-config.js":
            return self._send_bytes(self.app_config, "text/javascript")
        local = Path(self.translate_path(path))
        if not local.exists() or path == "/":
            # A client-side route (/viewer, /segmentation, ...): the single-page app answers it.
            return self._send_bytes((Path(self.directory) / "index.html").read_bytes(), "text/html")
        return super().do_GET()

    def do_HEAD(self) -> None:
        if self._is_dicomweb():
            return self._proxy()
        return super().do_HEAD()

    def do_POST(self) -> None:
        if self._is_dicomweb():
            return self._proxy()
        self.send_error(405)

    def do_PUT(self) -> None:
        self.do_POST()

    def do_DELETE(self) -> None:
        self.do_POST()

    def _send_bytes(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _proxy(self) -> None:
        """Forwards the request to the upstream DICOMweb root and relays the whole answer."""
        incoming = urllib.parse.urlsplit(self.path)
        upstream_path = self.upstream.path.rstrip("/") + incoming.path[len(DICOMWEB_PREFIX) :]
        if incoming.query:
            upstream_path += "?" + incoming.query
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
        # Host stays the viewer's: Orthanc writes it into BulkDataURIs, which must point back at this origin.
        connection = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=120)
        try:
            connection.request(self.command, upstream_path, body=body, headers=headers)
            answer = connection.getresponse()
            payload = answer.read()
        except OSError as error:
            self.send_error(502, f"DICOMweb upstream unreachable: {error}")
            return
        finally:
            connection.close()
        self.send_response(answer.status, answer.reason)
        for key, value in answer.getheaders():
            if key.lower() not in _HOP_HEADERS:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)


class OhifServer:
    """Serves OHIF's ``dist/`` and a pass-through to ``upstream_dicomweb`` on one 127.0.0.1 origin.

    The browser opens ``url`` (see :func:`viewer_url`); OHIF's data source is ``<url>/dicom-web``, which this
    server forwards to ``upstream_dicomweb`` (e.g. Orthanc's ``http://127.0.0.1:<port>/dicom-web``). Runs in a
    background thread of the calling process; use as a context manager or call :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        upstream_dicomweb: str,
        dist_dir: Path | None = None,
        port: int = 0,
        auto_load_segmentations: bool = True,
    ) -> None:
        self.dist_dir = Path(dist_dir) if dist_dir is not None else ohif_dist_dir()
        if not (self.dist_dir / "index.html").is_file():
            raise FileNotFoundError(
                f"OHIF viewer not found: {self.dist_dir / 'index.html'} (run fetch_ohif_dist)"
            )
        upstream = urllib.parse.urlsplit(upstream_dicomweb)
        if upstream.scheme != "http" or not upstream.hostname or not upstream.port:
            raise ValueError(f"upstream_dicomweb must be http://host:port/root, got {upstream_dicomweb!r}")
        handler = partial(
            _OhifHandler,
            app_config=app_config_js(DICOMWEB_PREFIX, auto_load_segmentations).encode(),
            upstream=upstream,
            directory=str(self.dist_dir),
        )
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> OhifServer:
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="ohif-server", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def __enter__(self) -> OhifServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """``python tests/support/ohif.py --dicomweb http://127.0.0.1:8042/dicom-web``: serve OHIF on that DICOMweb root."""
    import argparse
    import time

    parser = argparse.ArgumentParser(
        description="Serve OHIF's prebuilt viewer in front of a DICOMweb server."
    )
    parser.add_argument(
        "--dicomweb", required=True, help="DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web"
    )
    parser.add_argument("--port", type=int, default=3000, help="port on 127.0.0.1 (default 3000)")
    parser.add_argument("--version", default=OHIF_VERSION, help=f"@ohif/app version (default {OHIF_VERSION})")
    args = parser.parse_args(argv)
    with OhifServer(args.dicomweb, dist_dir=fetch_ohif_dist(args.version), port=args.port) as server:
        print(
            f"OHIF {args.version} at {server.url}/ (DICOMweb {args.dicomweb} behind {server.url}{DICOMWEB_PREFIX})"
        )
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    raise SystemExit(main())
