"""Unpacking an uploaded archive (``PUT /session/?uncompress=true``) without trusting it: every member is checked
before anything is extracted (a relative name without ``..``, a plain file or folder, no links or devices),
and the member count and the unpacked size are bounded."""

from __future__ import annotations

import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from ...user_input import UserInputError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
MAX_MEMBERS = 10_000  # a DICOM series of a few thousand files fits


def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def _check_name(name: str, archive: str) -> None:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not parts or name.startswith(("/", "\\")) or ":" in parts[0] or ".." in parts or "\x00" in name:
        raise UserInputError(
            f"archive {archive!r} holds the member {name[:120]!r}, which would land outside its folder"
        )


def extract_archive(archive: Path, dest: Path, max_bytes: int, max_members: int = MAX_MEMBERS) -> None:
    """Unpack ``archive`` (zip or tar, by its name) into ``dest`` after checking every member.

    Raises:
        UserInputError: an unreadable archive, a member that is a link / device or leaves ``dest``, more than
            ``max_members`` members, or more than ``max_bytes`` unpacked.
    """
    name = archive.name
    lower = name.lower()
    try:
        if lower.endswith(".zip"):
            _extract_zip(archive, dest, max_bytes, max_members)
        elif is_archive(lower):
            _extract_tar(archive, dest, max_bytes, max_members)
        else:
            raise UserInputError(f"{name!r} is not an archive ({', '.join(ARCHIVE_SUFFIXES)})")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as err:
        raise UserInputError(f"archive {name!r} cannot be read: {err}") from err
    except (
        OSError
    ) as err:  # a member that clashes with another (a file and a folder of one name): no server path
        member = ""
        if err.filename and Path(err.filename).is_relative_to(dest):
            member = f" at {Path(err.filename).relative_to(dest).as_posix()!r}"
        raise UserInputError(
            f"archive {name!r} cannot be unpacked{member}: {err.strerror or type(err).__name__}"
        ) from err


def _too_big(archive: str, total: int, max_bytes: int) -> UserInputError:
    return UserInputError(
        f"archive {archive!r} unpacks to more than {max_bytes / 2**20:,.0f} MiB ({total / 2**20:,.0f} MiB so far)"
    )


def _extract_tar(archive: Path, dest: Path, max_bytes: int, max_members: int) -> None:
    with tarfile.open(archive) as tar:
        members, total = [], 0
        for member in tar:
            members.append(member)
            if len(members) > max_members:
                raise UserInputError(f"archive {archive.name!r} has more than {max_members} members")
            _check_name(member.name, archive.name)
            if not (member.isfile() or member.isdir()):
                raise UserInputError(
                    f"archive {archive.name!r} holds {member.name[:120]!r}, which is a link or a device, not a file"
                )
            total += member.size
            if total > max_bytes:
                raise _too_big(archive.name, total, max_bytes)
        tar.extractall(dest, members=members, filter="data")


def _extract_zip(archive: Path, dest: Path, max_bytes: int, max_members: int) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if not infos:
            raise UserInputError(f"archive {archive.name!r} is empty")
        if len(infos) > max_members:
            raise UserInputError(f"archive {archive.name!r} has {len(infos)} members; at most {max_members}")
        for info in infos:
            _check_name(info.filename, archive.name)
            kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the zip tool stored no file type
            if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                raise UserInputError(
                    f"archive {archive.name!r} holds {info.filename[:120]!r}, which is a link or a device, not a file"
                )
        total = 0
        for info in infos:  # sizes in a zip directory can lie: count what is really written
            target = dest / PurePosixPath(info.filename.replace("\\", "/"))
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                while chunk := src.read(1024**2):
                    total += len(chunk)
                    if total > max_bytes:
                        raise _too_big(archive.name, total, max_bytes)
                    out.write(chunk)
