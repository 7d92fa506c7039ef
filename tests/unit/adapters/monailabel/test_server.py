"""Fast tests of the ``medplib serve`` launcher pieces (monai_medplib/adapters/monailabel/server.py); no server is started."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from monai_medplib.adapters.monailabel import server as serve


def test_pydicom_seg_imports_on_pydicom3_through_the_installed_hook():
    # scripts/install.sh puts a .pth in the venv that installs the hook at start-up, so a plain
    # `monailabel start_server` (which imports pydicom-seg) works; without the hook pydicom 3 breaks it.
    drop_hook = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path "
        "if type(f).__name__ != '_SopClassAliasFinder']; "
    )
    plain = subprocess.run(
        [sys.executable, "-c", drop_hook + "import pydicom_seg"], capture_output=True, text=True
    )
    hooked = subprocess.run([sys.executable, "-c", "import pydicom_seg"], capture_output=True, text=True)
    import pydicom

    if int(pydicom.__version__.split(".")[0]) >= 3:
        assert "_storage_sopclass_uids" in plain.stderr
    assert hooked.returncode == 0, hooked.stderr
    serve.install_pydicom3_compat()
    from pydicom._storage_sopclass_uids import SegmentationStorage

    assert SegmentationStorage == "1.2.840.10008.5.1.4.1.1.66.4"


def test_dcmqi_stub_is_found_on_path_and_fails_loudly(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("PATH", os.environ.get("PATH", ""))
    tool = serve.install_dcmqi_stub(tmp_path)
    assert shutil.which("itkimage2segimage") == str(tool)
    run = subprocess.run([str(tool), "--help"], capture_output=True, text=True)
    assert run.returncode != 0 and "pydicom" in run.stderr


def test_serve_parser_and_server_command():
    from monai_medplib.cli import build_parser
    from monai_medplib.commands import serve as serve_command

    args = build_parser().parse_args(
        ["serve", "--studies", "/data", "--model", "/m", "--port", "8123", "--conf", "models", "medplib_vqa"]
    )
    assert args.run is serve_command.run
    argv = serve.server_argv(args)
    assert argv[:5] == ["start_server", "--app", str(serve.app_dir()), "--studies", "/data"]
    assert argv[argv.index("--uvicorn_app") + 1] == "monai_medplib.adapters.monailabel.server:app"
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "8123"
    confs = [tuple(argv[i + 1 : i + 3]) for i, a in enumerate(argv) if a == "--conf"]
    assert confs == [("model", "/m"), ("device", "auto"), ("models", "medplib_vqa")]


def test_run_serve_rejects_a_missing_model_dir(tmp_path):
    args = argparse.Namespace(app=str(serve.app_dir()), studies=str(tmp_path), model=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="nope"):
        serve.run_serve(args)


@pytest.mark.slow  # imports the whole MONAI Label server (about 12 s)
def test_hardened_app_routes_infer_to_a_sync_handler_first():
    import inspect

    app = serve.build_app()
    ours = getattr(app.state, serve._HARDENED_FLAG)
    (route,) = ours.routes
    assert route.path == "/infer/{model}" and "POST" in route.methods
    # a plain `def` endpoint: FastAPI runs it in its thread pool instead of on the event loop
    assert not inspect.iscoroutinefunction(route.endpoint)
    # first in the app's route list (flattened copy or included-router wrapper), so it shadows the stock route
    first = app.router.routes[0]
    assert (
        getattr(first, "original_router", None) is ours or getattr(first, "endpoint", None) is route.endpoint
    )
    count = len(app.router.routes)
    serve.harden_infer_route(app)  # idempotent
    assert len(app.router.routes) == count
