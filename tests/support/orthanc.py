"""A real Orthanc PACS with its DICOMweb plugin, started for a test and stopped after it.

Orthanc comes from Debian (``scripts/install_e2e.sh``). Each instance gets its own configuration, storage and
free HTTP port, answers only on the local machine (``RemoteAccessAllowed`` false, no DICOM listener) and is
driven through its REST API. Used by the browser end-to-end test and by anything that needs a DICOMweb server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

ORTHANC_EXECUTABLE = "Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def missing_orthanc() -> str | None:
    """Says what of the Orthanc install is missing, or None when Orthanc and its DICOMweb plugin are there."""
    if shutil.which(ORTHANC_EXECUTABLE) is None:
        return f"'{ORTHANC_EXECUTABLE}' is not on PATH (run scripts/install_e2e.sh)"
    if not DICOMWEB_PLUGIN.is_file():
        return f"the Orthanc DICOMweb plugin {DICOMWEB_PLUGIN} is missing (run scripts/install_e2e.sh)"
    return None


def free_local_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def orthanc_config(work_dir: Path, http_port: int) -> dict:
    """The Orthanc configuration used for tests: local-only HTTP, DICOMweb on, storage under ``work_dir``."""
    storage = str(work_dir / "storage")
    return {
        "Name": "monai-medplib-e2e",
        "HttpPort": http_port,
        # Orthanc listens on every interface but refuses any client that is not the local machine.
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        # No DICOM (DIMSE) listener: the tests use HTTP only, and a fixed DICOM port would clash in parallel runs.
        "DicomServerEnabled": False,
        "StorageDirectory": storage,
        "IndexDirectory": storage,
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        # Plain bodies keep the pass-through proxy in tests/support/ohif.py trivial.
        "HttpCompressionEnabled": False,
        "SaveJobs": False,
        "HttpThreadsCount": 16,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": True,
            "WadoRoot": "/wado",
            "Ssl": False,
            # Full metadata in one request per series: what OHIF's study lazy-loading asks for.
            "StudiesMetadata": "Full",
            "SeriesMetadata": "Full",
        },
    }


class OrthancServer:
    """One Orthanc process with the DICOMweb plugin, on a free 127.0.0.1 port, storing under ``work_dir``.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. ``url`` is the REST root and
    ``dicomweb_root`` the DICOMweb root (QIDO-RS, WADO-RS and STOW-RS share it).
    """

    def __init__(self, work_dir: Path, port: int | None = None, start_timeout_s: float = 30.0) -> None:
        self.work_dir = Path(work_dir)
        self.port = port or free_local_port()
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen | None = None
        self.log_path = self.work_dir / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_root(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self) -> OrthancServer:
        """Writes ``cfg.json`` and starts Orthanc; returns once its REST API answers."""
        missing = missing_orthanc()
        if missing:
            raise FileNotFoundError(missing)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.work_dir / "cfg.json"
        config_path.write_text(json.dumps(orthanc_config(self.work_dir, self.port), indent=2))
        log = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child, closed in stop()
        self._log = log
        # Its own process group, so stop() ends Orthanc and nothing else.
        self.process = subprocess.Popen(
            [ORTHANC_EXECUTABLE, str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.work_dir,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}: {self.log_tail()}")
            try:
                if self.get_json("/plugins").count("dicom-web") == 1:
                    return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"Orthanc did not answer on {self.url} within {self.start_timeout_s} s")

    def stop(self) -> None:
        """Ends the Orthanc process group (SIGTERM, then SIGKILL after 10 s)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.process = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log_tail(self, n_chars: int = 2000) -> str:
        """The end of Orthanc's log, for error messages."""
        return self.log_path.read_text(errors="replace")[-n_chars:] if self.log_path.exists() else ""

    def get_json(self, path: str) -> object:
        """GET a REST path (``/studies``, ``/series/<id>``) and decode its JSON answer."""
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def get_bytes(self, path: str) -> bytes:
        """GET a REST path (``/instances/<id>/file``) and return the raw answer."""
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return response.read()

    def upload(self, files: Iterable[Path]) -> list[dict]:
        """Stores DICOM files through ``POST /instances``; returns Orthanc's answer for each file.

        Raises:
            ValueError: when Orthanc rejects a file (the file name and Orthanc's answer are in the message).
        """
        answers = []
        for path in files:
            request = urllib.request.Request(
                self.url + "/instances",
                data=Path(path).read_bytes(),
                headers={"Content-Type": "application/dicom"},
                method="POST",
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = json.loads(response.read())
            except urllib.error.HTTPError as error:
                raise ValueError(
                    f"Orthanc rejected {path}: HTTP {error.code} {error.read()[:500]!r}"
                ) from error
            if answer.get("Status") not in ("Success", "AlreadyStored"):
                raise ValueError(f"Orthanc did not store {path}: {answer}")
            answers.append(answer)
        return answers

    def series_instance_uids(self) -> list[str]:
        """SeriesInstanceUIDs of every series Orthanc holds."""
        uids = []
        for series_id in self.get_json("/series"):
            tags = self.get_json(f"/series/{series_id}")["MainDicomTags"]
            uids.append(tags["SeriesInstanceUID"])
        return uids
