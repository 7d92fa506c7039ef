"""Fast tests of the ``medplib serve`` launcher pieces (monai_medplib/adapters/monailabel/server.py); no server is started."""

from __future__ import annotations

import argparse
import json
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


def test_security_flags_become_settings(tmp_path):
    from monai_medplib.adapters.monailabel.launch import (
        check_before_start,
        serve_environment,
        write_log_config,
    )
    from monai_medplib.cli import build_parser
    from monai_medplib.user_input import UserInputError

    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123\n")
    argv = ["serve", "--studies", str(tmp_path), "--host", "0.0.0.0", "--auth-token-file", str(token)]
    argv += ["--enable", "logs", "--cors-origin", "https://viewer.example", "--max-upload-mb", "5"]
    args = build_parser().parse_args(argv)
    env = serve_environment(args, env={"MEDPLIB_AUTH_TOKEN": "from-the-environment-0123", "PATH": "/bin"})
    assert env == {
        "MEDPLIB_AUTH_TOKEN_FILE": str(token),
        "MEDPLIB_ENABLE": "logs",
        "MEDPLIB_CORS_ORIGINS": "https://viewer.example",
        "MEDPLIB_MAX_UPLOAD_MB": "5",
    }
    settings = check_before_start(args, env)
    assert settings.auth_token == "0123456789abcdef0123" and settings.max_upload_bytes == 5 * 2**20
    config = json.loads(write_log_config(tmp_path, tmp_path / "app", settings).read_text())
    assert config["handlers"]["file_handler"]["filename"] == str(tmp_path / "app" / "logs" / "app.log")
    quiet = build_parser().parse_args(["serve", "--studies", str(tmp_path)])
    config = json.loads(
        write_log_config(tmp_path, tmp_path / "app", check_before_start(quiet, {})).read_text()
    )
    assert config["root"]["handlers"] == ["console"]  # no log file unless /logs is on
    open_ = build_parser().parse_args(["serve", "--studies", str(tmp_path), "--host", "0.0.0.0"])
    with pytest.raises(UserInputError, match="refusing to listen"):
        check_before_start(open_, serve_environment(open_, env={}))


@pytest.mark.slow  # imports the whole MONAI Label server (about 12 s)
def test_build_app_is_hardened_and_idempotent():
    from fastapi.middleware.cors import CORSMiddleware
    from monailabel.endpoints import batch_infer, infer, logs, model

    from monai_medplib.adapters.monailabel.guard import RequestGuard
    from monai_medplib.adapters.monailabel.hardening import harden

    app = serve.build_app()
    classes = [m.cls for m in app.user_middleware]
    assert CORSMiddleware not in classes and classes.count(RequestGuard) == 1
    stock = {id(r.original_router) for r in app.router.routes if hasattr(r, "original_router")}
    assert not stock & {id(logs.router), id(batch_infer.router), id(model.router)}
    assert not any(getattr(r, "path", "") == "/reload" for r in app.router.routes)
    # our /infer router comes before MONAI Label's, which stays registered but unreachable
    paths = [
        (getattr(r, "original_router", None), [x.path for x in getattr(r, "original_router", r).routes])
        if hasattr(r, "original_router")
        else (None, [getattr(r, "path", "")])
        for r in app.router.routes
    ]
    first_infer = next(i for i, (_, ps) in enumerate(paths) if any(p.endswith("{model}") for p in ps))
    stock_infer = next(i for i, (router, _) in enumerate(paths) if router is infer.router)
    assert first_infer < stock_infer
    count = len(app.router.routes)
    harden(app)
    assert len(app.router.routes) == count and [m.cls for m in app.user_middleware] == classes
