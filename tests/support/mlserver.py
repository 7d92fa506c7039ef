"""Start and stop a real MONAI Label server (the MedPLIB app) on a free 127.0.0.1 port, for tests.

Reusable by any test (app tests, the OHIF end-to-end test)::

    from tests.support.mlserver import MONAILabelServer

    with MONAILabelServer(studies=tmp_path / "studies", model=str(model_dir)) as server:
        requests.get(server.url + "/info/")

The server runs as ``python -m monai_medplib.adapters.monailabel.server`` (the ``medplib serve`` launcher) in its own process
group, so stopping it also stops anything it started; ``launcher="monailabel"`` runs
a plain ``python -m monailabel.main start_server --app apps/medplib`` instead.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.paths import REPO

APP_DIR = REPO / "apps" / "medplib"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class MONAILabelServer:
    """A MONAI Label server process serving ``apps/medplib``.

    Args:
        studies: local studies folder or a DICOMweb root URL.
        model: model directory or "demo".
        conf: extra ``--conf`` pairs (e.g. ``{"models": "medplib_vqa"}``).
        env: extra environment variables (e.g. ``MONAI_LABEL_DICOMWEB_SEARCH_FILTER``).
        launcher: "medplib" (``python -m monai_medplib.adapters.monailabel.server``) or "monailabel" (``monailabel.main``).
        startup_timeout: seconds to wait for ``GET /info/`` to answer.
        log_path: where the server's stdout/stderr go (default: a temp file, see ``log_text()``).
        auth_token: the server's access token (given in ``env`` as ``MEDPLIB_AUTH_TOKEN``), sent while waiting
            for ``GET /info/``.
    """

    def __init__(
        self,
        studies: str | Path,
        model: str = "demo",
        conf: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        launcher: str = "medplib",
        device: str = "cpu",
        host: str = "127.0.0.1",
        port: int | None = None,
        startup_timeout: float = 300.0,
        log_path: str | Path | None = None,
        app_dir: str | Path = APP_DIR,
        auth_token: str | None = None,
    ) -> None:
        self.studies, self.model, self.conf = str(studies), model, dict(conf or {})
        self.extra_env, self.launcher, self.device = dict(env or {}), launcher, device
        self.host, self.port = host, port or free_port(host)
        self.startup_timeout = startup_timeout
        self.app_dir = str(app_dir)
        self.auth_token = auth_token
        self.log_path = Path(log_path or tempfile.mkstemp(prefix="mlserver-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        confs = [("device", self.device), *self.conf.items()]
        if self.launcher == "medplib":
            cmd = [
                sys.executable,
                "-m",
                "monai_medplib.adapters.monailabel.server",
                "--app",
                self.app_dir,
                "--studies",
                self.studies,
            ]
            cmd += [
                "--model",
                self.model,
                "--host",
                self.host,
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ]
        elif self.launcher == "monailabel":
            cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", self.app_dir]
            cmd += ["--studies", self.studies, "--host", self.host, "--port", str(self.port)]
            cmd += ["--conf", "model", self.model]  # plain MONAI Label: no launcher of ours
        else:
            raise ValueError(f"launcher must be 'medplib' or 'monailabel', got {self.launcher!r}")
        for key, value in confs:
            cmd += ["--conf", key, str(value)]
        return cmd

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        path = [str(REPO), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
        env.setdefault("MONAI_LABEL_TASKS_TRAIN", "false")
        env.setdefault("MONAI_LABEL_DATASTORE_AUTO_RELOAD", "false")
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        return env

    def start(self) -> MONAILabelServer:
        if self.process is not None:
            raise RuntimeError("server already started")
        start = time.perf_counter()
        log = open(self.log_path, "wb")  # noqa: SIM115 - kept open for the child's lifetime
        self.process = subprocess.Popen(
            self.command(),
            cwd=str(REPO),
            env=self.environment(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() ends the server and its children
        )
        log.close()
        deadline = start + self.startup_timeout
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.process.returncode}:\n{self.log_text()[-4000:]}"
                )
            try:
                headers = {"Authorization": f"Bearer {self.auth_token}"} if self.auth_token else {}
                probe = urllib.request.Request(self.url + "/info/", headers=headers)
                with urllib.request.urlopen(probe, timeout=5) as reply:
                    if reply.status == 200:
                        self.startup_seconds = time.perf_counter() - start
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"server not up after {self.startup_timeout} s:\n{self.log_text()[-4000:]}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def rss_bytes(self) -> int:
        """Resident memory of the server process (and its children)."""
        import psutil

        if not self.alive():
            raise RuntimeError("server is not running")
        proc = psutil.Process(self.process.pid)
        return proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the server's process group, then SIGKILL whatever is left after ``timeout``."""
        if self.process is None:
            return
        pgid = self.process.pid  # start_new_session: the group id is the server's pid
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.process = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> MONAILabelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
