"""The server's name rules, archive checks and settings (monai_medplib/adapters/monailabel/names.py, archives.py,
settings.py): pure functions on real files, no server."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from monai_medplib.adapters.monailabel import names
from monai_medplib.adapters.monailabel.archives import extract_archive
from monai_medplib.adapters.monailabel.settings import (
    FEATURES,
    ServerSettings,
    bound_host,
    is_loopback,
    read_token_file,
    state_dir,
)
from monai_medplib.user_input import UserInputError

TOKEN = "0123456789abcdef-token"


@pytest.mark.parametrize(
    "value, problem",
    [
        ("../outside/x", "path separator"),
        ("/etc/passwd", "path separator"),
        ("a\\b", "path separator"),
        ("..", "'..'"),
        ("a..b", "'..'"),
        ("", "is empty"),
        (".hidden", "start with a letter or digit"),
        (" ct", "start with a letter or digit"),
        ("ct ", "not end with a space"),
        ("ct;1", "may only hold"),
        ("x" * 129, "longer than 128"),
        ("ct\n1", "control characters"),
    ],
)
def test_bad_image_ids_are_refused_with_the_reason(value, problem):
    with pytest.raises(UserInputError, match=problem):
        names.image_id(value)


def test_good_names_pass_unchanged():
    assert names.image_id("lits-117_v2.ct") == "lits-117_v2.ct"
    # 3D Slicer uploads under the volume node's name: a DICOM-loaded series is "<number>: <description>"
    for slicer_name in (
        "2: CT Abdomen",
        "CT Abdomen (contrast)",
        "Lebér",
        "山田",
        "case-",
        "scan.",
    ):  # old ids too
        assert names.image_id(slicer_name) == slicer_name
    assert names.label_tag("final") == "final"
    assert names.upload_name("C:\\Users\\me\\scan.nii.gz", "file") == "scan.nii.gz"  # Slicer sends full paths
    assert names.upload_name("/home/me/scribbles.nrrd", "label") == "scribbles.nrrd"
    uid = "1.2.826.0.1.3680043.8.498.1"
    assert names.dicom_uid(uid) == uid
    assert names.session_id("8C6B5F52-0C2E-11EF-9A4F-0242AC120002") == "8c6b5f52-0c2e-11ef-9a4f-0242ac120002"


@pytest.mark.parametrize("value", ["../x", "a.b", "x" * 65, ""])
def test_bad_label_tags(value):
    with pytest.raises(UserInputError, match="label tag"):
        names.label_tag(value)


@pytest.mark.parametrize("value", ["..", "/", "dir/..", ""])
def test_upload_names_without_a_file_name_are_refused(value):
    with pytest.raises(UserInputError, match="uploaded as 'file'"):
        names.upload_name(value, "file")


@pytest.mark.parametrize("value", ["../../etc", "1.2.3/../4", "1..2", "abc", "1.2." + "3" * 70])
def test_dicom_uids(value):
    with pytest.raises(UserInputError, match="not a DICOM UID"):
        names.dicom_uid(value)


def test_session_ids_are_uuids():
    with pytest.raises(UserInputError, match="not a session id"):
        names.session_id("../../x")


def test_inside_follows_symlinks(tmp_path):
    root = tmp_path / "studies"
    (root / "labels").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", root / "labels" / "final")
    assert names.inside(root / "labels" / "x.nii.gz", root) == (root / "labels" / "x.nii.gz").resolve()
    with pytest.raises(UserInputError, match="outside"):
        names.inside(root / "labels" / "final" / "x.nii.gz", root)


# ---------------------------------------------------------------------------------------------- archives
def _tar(path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tar:
        for info in members:
            payload = (data or {}).get(info.name, b"")
            if info.isfile():
                info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload) if info.isfile() else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize(
    "member, words",
    [
        (_member("../escaped.txt"), "outside its folder"),
        (_member("a/../../escaped.txt"), "outside its folder"),
        (_member("/tmp/absolute.txt"), "outside its folder"),
        (_member("link", tarfile.SYMTYPE, "/etc"), "link or a device"),
        (_member("hard", tarfile.LNKTYPE, "/etc/passwd"), "link or a device"),
        (_member("dev", tarfile.CHRTYPE), "link or a device"),
    ],
)
def test_tar_members_are_checked_before_anything_is_extracted(tmp_path, member, words):
    archive = _tar(tmp_path / "a.tar", [_member("good.txt"), member], {"good.txt": b"ok"})
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UserInputError, match=words):
        extract_archive(archive, dest, max_bytes=2**20)
    assert list(dest.iterdir()) == []  # not even the good member
    assert not (tmp_path / "escaped.txt").exists()


def test_good_tar_gz_is_unpacked(tmp_path):
    archive = _tar(
        tmp_path / "series.tar.gz",
        [_member("s/1.dcm"), _member("s/2.dcm")],
        {"s/1.dcm": b"a", "s/2.dcm": b"bc"},
    )
    dest = tmp_path / "dest"
    dest.mkdir()
    extract_archive(archive, dest, max_bytes=10)
    assert (dest / "s" / "1.dcm").read_bytes() == b"a" and (dest / "s" / "2.dcm").read_bytes() == b"bc"


def test_tar_over_the_size_limit(tmp_path):
    archive = _tar(tmp_path / "a.tar", [_member("big")], {"big": b"x" * 2000})
    with pytest.raises(UserInputError, match="unpacks to more than"):
        extract_archive(archive, tmp_path, max_bytes=1000)


def test_zip_members(tmp_path):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../escaped.txt", b"x")
    with pytest.raises(UserInputError, match="outside its folder"):
        extract_archive(bad, tmp_path / "dest", max_bytes=2**20)
    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = 0o120777 << 16  # a symlink entry, as zip -y stores one
        zf.writestr(info, "/etc")
    with pytest.raises(UserInputError, match="link or a device"):
        extract_archive(link, tmp_path / "dest", max_bytes=2**20)
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros", b"\0" * 10**6)
    assert bomb.stat().st_size < 10_000
    (tmp_path / "dest").mkdir()
    with pytest.raises(UserInputError, match="unpacks to more than"):
        extract_archive(bomb, tmp_path / "dest", max_bytes=10**5)


def test_not_an_archive(tmp_path):
    junk = tmp_path / "a.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(UserInputError, match="cannot be read"):
        extract_archive(junk, tmp_path, max_bytes=2**20)


# ---------------------------------------------------------------------------------------------- settings
def test_settings_from_env(tmp_path):
    assert ServerSettings.from_env({}) == ServerSettings()
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")
    settings = ServerSettings.from_env(
        {
            "MEDPLIB_AUTH_TOKEN_FILE": str(token_file),
            "MEDPLIB_ENABLE": "logs, archives",
            "MEDPLIB_CORS_ORIGINS": "https://viewer.example:3000/",
            "MEDPLIB_MAX_UPLOAD_MB": "12",
        }
    )
    assert settings.auth_token == TOKEN and settings.enabled == {"logs", "archives"}
    assert (
        settings.cors_origins == ("https://viewer.example:3000",) and settings.max_upload_bytes == 12 * 2**20
    )
    for env, words in (
        ({"MEDPLIB_ENABLE": "everything"}, "unknown feature"),
        ({"MEDPLIB_MAX_UPLOAD_MB": "lots"}, "MEDPLIB_MAX_UPLOAD_MB"),
        ({"MEDPLIB_AUTH_TOKEN": "short"}, "at least 16"),
        ({"MEDPLIB_CORS_ORIGINS": "viewer"}, "not an origin"),
        ({"MEDPLIB_AUTH_TOKEN_FILE": str(tmp_path / "missing")}, "cannot be read"),
    ):
        with pytest.raises(UserInputError, match=words):
            ServerSettings.from_env(env)
    with pytest.raises(UserInputError, match="cannot be read"):
        read_token_file(tmp_path)


def test_bind_rules():
    assert (
        is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("[::1]")
    )
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")
    ServerSettings().check_bind("127.0.0.1")
    ServerSettings(auth_token=TOKEN).check_bind("0.0.0.0")
    ServerSettings(insecure_no_auth=True).check_bind("0.0.0.0")
    with pytest.raises(UserInputError, match="refusing to listen on '10.1.2.3'"):
        ServerSettings().check_bind("10.1.2.3")
    assert bound_host(["start_server", "--app", "a"]) == "0.0.0.0"  # monailabel's default
    assert bound_host(["start_server", "--host", "127.0.0.1"]) == "127.0.0.1"
    assert bound_host(["uvicorn", "x:app"]) == "127.0.0.1"


def test_every_feature_says_how_to_turn_it_on():
    for feature in FEATURES.values():
        message = ServerSettings().refusal(feature)
        assert f"--enable {feature.name}" in message and f"MEDPLIB_ENABLE={feature.name}" in message


def test_state_dir():
    assert state_dir("/data/studies", {}) == Path("/data/studies/.medplib")
    assert state_dir("http://pacs/dicom-web", {}).parts[-3:] == (".cache", "monai-medplib", "server")
    assert state_dir("/data/studies", {"MEDPLIB_STATE_DIR": "/srv/state"}) == Path("/srv/state")


def _peak_bytes(call) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        call()
    except UserInputError as err:
        message = str(err)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak, message


@pytest.mark.parametrize("kind", ["pax", "gnu"])
def test_a_tar_member_header_of_megabytes_is_refused_before_it_is_read(tmp_path, kind):
    """tarfile reads a PAX record or GNU long name whole: a 400 KB tar.gz of one 400 MiB header took the server
    to 4 GB, and the refusal then quoted the 400 MiB path back. Here 16 MiB, refused at its header."""
    name = "d/" * (8 * 2**20)  # 16 MiB of path
    info = tarfile.TarInfo(name + "x.dcm")
    fmt = tarfile.PAX_FORMAT if kind == "pax" else tarfile.GNU_FORMAT
    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz", format=fmt) as tar:
        tar.addfile(info, io.BytesIO(b""))
    assert archive.stat().st_size < 100_000
    dest = tmp_path / "dest"
    dest.mkdir()
    peak, message = _peak_bytes(lambda: extract_archive(archive, dest, max_bytes=2**30))
    assert "member header" in message and len(message) < 300
    assert peak < 4 * 2**20, peak  # the header was never held (16 MiB and more before)
    assert list(dest.iterdir()) == []


def test_a_long_but_real_path_in_a_pax_tar_still_unpacks(tmp_path):
    name = "series/" + "sub/" * 60 + "1.dcm"  # 250 characters: a PAX record of a few hundred bytes
    archive = tmp_path / "ok.tar.gz"
    with tarfile.open(archive, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = 2
        tar.addfile(info, io.BytesIO(b"ok"))
    dest = tmp_path / "dest"
    dest.mkdir()
    extract_archive(archive, dest, max_bytes=2**20)
    assert (dest / name).read_bytes() == b"ok"


def test_a_zip_of_too_many_members_is_refused_from_its_end_record(tmp_path):
    """zipfile parses the whole member list before the count can be checked (~7x its size in memory); the end
    record gives the count first. 70,000 members: the zip64 end record."""
    archive = tmp_path / "many.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for n in range(70_000):
            zf.writestr(f"{n}", b"")
    peak, message = _peak_bytes(lambda: extract_archive(archive, tmp_path / "dest", max_bytes=2**30))
    assert "has 70000 members; at most 10000" in message
    assert peak < 2 * 2**20, peak
