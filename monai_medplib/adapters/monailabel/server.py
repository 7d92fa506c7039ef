"""`medplib serve`: run the real MONAI Label server with the MedPLIB app, offline and on pydicom 3.

What this launcher adds to a plain ``monailabel start_server --app apps/medplib``:

* pydicom 3 compatibility: pydicom-seg 0.4.1 (imported by MONAI Label 0.8.5) still imports
  ``pydicom._storage_sopclass_uids``, which pydicom 3 removed. An alias module backed by ``pydicom.uid``
  is registered before MONAI Label is imported.
* No download at start-up: MONAI Label fetches the dcmqi tools when the studies are a DICOMweb URL
  unless an ``itkimage2segimage`` executable is found; a stub is placed on ``PATH``.
* DICOM-SEG through this package's writer (:mod:`.seg_export`), which needs no dcmqi binary and keeps the
  series' frame of reference and text.
* Hardening for a server next to patient data (:mod:`.hardening`): our own ``/infer``, datastore, session
  and OHIF routes, the operational routes off, no CORS by default, a bearer token (:mod:`.guard`), and a
  refusal to listen on a non-loopback address without one (:mod:`.launch`, :mod:`.settings`).

The uvicorn application is ``monai_medplib.adapters.monailabel.server:app`` (built lazily on first access).
The MONAI Label app itself (``apps/medplib``) is found by :func:`app_dir`.
"""

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from .seg_export import use_medplib_dicom_seg

logger = logging.getLogger(__name__)

UVICORN_APP = "monai_medplib.adapters.monailabel.server:app"
DCMQI_TOOL = "itkimage2segimage"


def app_dir() -> Path:
    """The MedPLIB MONAI Label app folder (the one holding ``main.py``): the copy inside the installed wheel, or
    ``apps/medplib`` of the clone this package was installed from (``pip install -e .``).

    MONAI Label creates ``logs/``, ``model/`` and ``bin/`` inside the app folder; when the installed copy is not
    writable (a system-wide install), the app is copied once to ``~/.cache/monai-medplib/app-<version>`` (or
    ``$MEDPLIB_APP_CACHE``) and that copy is returned.

    Raises:
        FileNotFoundError: no app found (pass ``--app`` with the folder of ``apps/medplib``).
    """
    import shutil

    from ... import __version__
    from ..shipped import EXCLUDED, shipped_dir

    folder = shipped_dir("app")
    if os.access(folder, os.W_OK):
        return folder
    cache = Path(os.environ.get("MEDPLIB_APP_CACHE", Path.home() / ".cache" / "monai-medplib"))
    copy = cache / f"app-{__version__}"
    if not (copy / "main.py").is_file():
        staging = cache / f".app-{__version__}-{os.getpid()}"
        shutil.copytree(folder, staging, ignore=shutil.ignore_patterns(*EXCLUDED), dirs_exist_ok=True)
        if copy.exists():  # another process copied it meanwhile
            shutil.rmtree(staging)
        else:
            staging.replace(copy)
    return copy


def install_pydicom3_compat() -> None:
    """Serve ``pydicom._storage_sopclass_uids`` from ``pydicom.uid`` when pydicom 3 lacks it."""
    from .pydicom_compat import install

    install()


def install_dcmqi_stub(bin_dir: str | Path | None = None) -> Path:
    """Put a stub ``itkimage2segimage`` first on ``PATH`` so MONAI Label skips the dcmqi download.

    The stub is never run by this launcher (DICOM-SEG goes through pydicom); if something calls it, it
    fails with a message instead of hanging on a network download.
    """
    bin_dir = Path(bin_dir or Path(tempfile.gettempdir()) / "medplib-bin")
    bin_dir.mkdir(parents=True, exist_ok=True)
    tool = bin_dir / DCMQI_TOOL
    if not tool.exists():
        tool.write_text(
            "#!/bin/sh\n"
            'echo "itkimage2segimage (dcmqi) is not installed; medplib serve writes DICOM-SEG with pydicom" >&2\n'
            "exit 2\n"
        )
        tool.chmod(0o755)
    path = os.environ.get("PATH", "")
    if str(bin_dir) not in path.split(os.pathsep):
        os.environ["PATH"] = str(bin_dir) + os.pathsep + path
    return tool


def prepare_environment(bin_dir: str | Path | None = None) -> None:
    """Everything that must happen before ``monailabel`` server modules are imported."""
    install_pydicom3_compat()
    install_dcmqi_stub(bin_dir)


def harden_running_server(studies: str) -> None:
    """Harden the MONAI Label FastAPI app this process serves (called first by the app's ``__init__``, so a plain
    ``monailabel start_server --app apps/medplib`` is hardened too) and use this package's DICOM-SEG writer."""
    from .hardening import prepare_app

    prepare_app(studies)
    if "monailabel.app" in sys.modules:
        use_medplib_dicom_seg()


def build_app() -> Any:
    """The MONAI Label FastAPI app with the compatibility fixes and the hardening (:mod:`.hardening`)."""
    from .hardening import harden

    prepare_environment(_state_bin())
    from monailabel.app import app as fastapi_app

    use_medplib_dicom_seg()
    harden(fastapi_app)
    return fastapi_app


def _state_bin() -> Path | None:
    """The dcmqi stub's folder inside the server's state folder, once the studies are known."""
    from .settings import state_dir

    studies = os.environ.get("MONAI_LABEL_STUDIES")
    return state_dir(studies) / "bin" if studies else None


def __getattr__(name: str) -> Any:
    # uvicorn resolves UVICORN_APP with getattr; build the server app only then.
    if name == "app":
        fastapi_app = build_app()
        globals()["app"] = fastapi_app
        return fastapi_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by ``medplib serve`` and ``python -m monai_medplib.adapters.monailabel.server``."""
    from .launch import add_security_arguments

    parser.add_argument("--studies", required=True, help="local folder of images or a DICOMweb root URL")
    parser.add_argument("--model", default="demo", help="model directory, or 'demo' (default)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto")
    parser.add_argument(
        "--app",
        default=None,
        help="MONAI Label app dir (default: the app installed with the package; apps/medplib in a clone)",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; others need a token)"
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--conf",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="app option (apps/medplib/README.md lists them), e.g. --conf models medplib_grounding,medplib_vqa",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_security_arguments(parser)


def server_argv(args: argparse.Namespace) -> list[str]:
    """The ``monailabel`` command line (after the program name) that ``run_serve`` executes in-process."""
    argv = ["start_server", "--app", str(args.app or app_dir()), "--studies", str(args.studies)]
    argv += ["--host", args.host, "--port", str(args.port), "--uvicorn_app", UVICORN_APP]
    argv += ["--log_level", args.log_level]
    if getattr(args, "log_config", None):
        argv += ["--log_config", str(args.log_config)]
    confs = [("model", str(args.model)), ("device", args.device), *[tuple(c) for c in args.conf]]
    for key, value in confs:
        argv += ["--conf", key, value]
    return argv


def run_serve(args: argparse.Namespace) -> int:
    """Start the server in this process (blocks until it stops). Returns the exit code.

    Raises:
        FileNotFoundError: the app, model or studies folder is missing.
        UserInputError: a bad security setting, a non-loopback ``--host`` without a token, an unusable device.
    """
    from .launch import check_before_start, serve_environment, write_log_config
    from .settings import state_dir

    app = Path(args.app) if args.app else app_dir()
    if not (app / "main.py").is_file():
        raise FileNotFoundError(f"MONAI Label app not found: {app}/main.py")
    model = str(args.model)
    if model != "demo" and not model.startswith("fake:") and not Path(model).is_dir():
        raise FileNotFoundError(f"--model {model!r} is neither 'demo' nor a model directory")
    if not str(args.studies).startswith(("http://", "https://")) and not Path(args.studies).is_dir():
        raise FileNotFoundError(f"--studies {args.studies!r} is neither a folder nor a DICOMweb URL")
    env = serve_environment(args)
    settings = check_before_start(args, env)
    os.environ.update(env)
    studies = str(args.studies)
    if not studies.startswith(("http://", "https://")):
        studies = os.path.realpath(studies)
    state = state_dir(studies)
    state.mkdir(parents=True, exist_ok=True)
    args.log_config = write_log_config(state, app.resolve(), settings)
    os.environ["MONAI_LABEL_STUDIES"] = studies
    prepare_environment(state / "bin")
    os.environ.setdefault("MONAI_LABEL_TASKS_TRAIN", "false")
    os.environ.setdefault("MONAI_LABEL_TASKS_SCORING", "false")
    from monailabel.main import Main

    saved_argv = sys.argv
    sys.argv = ["monailabel", *server_argv(args)]
    try:
        Main().run()
    finally:
        sys.argv = saved_argv
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m monai_medplib.adapters.monailabel.server --studies DIR [--model ...]`` (= ``medplib serve``)."""
    from ...user_input import UserInputError

    parser = argparse.ArgumentParser(
        prog="python -m monai_medplib.adapters.monailabel.server", description=__doc__.splitlines()[0]
    )
    add_serve_arguments(parser)
    try:
        return run_serve(parser.parse_args(argv))
    except (UserInputError, FileNotFoundError) as err:
        print(f"medplib serve: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
