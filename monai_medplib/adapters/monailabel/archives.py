"""Unpacking an uploaded archive (``PUT /session/?uncompress=true``) without trusting it: every member is checked
before anything is extracted (a relative name without ``..``, a plain file or folder, no links or devices),
and the member count and the unpacked size are bounded."""

from __future__ import annotations

import bz2
import gzip
import lzma
import stat
import struct
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from ...user_input import UserInputError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
MAX_MEMBERS = 10_000  # a DICOM series of a few thousand files fits
# Archive metadata read whole into memory by tarfile / zipfile before any member can be checked: a PAX record or a
# GNU long name (a path and a few attributes) and a zip's central directory (~100 bytes a member); a 400 KB
# tar.gz of one 400 MiB PAX header took the server to 4 GB.
MAX_TAR_HEADER_BYTES = 8 * 1024  # x MAX_MEMBERS: at most 80 MB of headers
MAX_ZIP_DIRECTORY_BYTES = 16 * 2**20
_TAR_LONG_HEADERS = frozenset({b"x", b"g", b"L", b"K"})  # PAX extended / global, GNU long name / long link
_COMPRESSED = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))


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
            member = f" at {Path(err.filename).relative_to(dest).as_posix()[:120]!r}"
        raise UserInputError(
            f"archive {name!r} cannot be unpacked{member}: {err.strerror or type(err).__name__}"
        ) from err


def _too_big(archive: str, total: int, max_bytes: int) -> UserInputError:
    return UserInputError(
        f"archive {archive!r} unpacks to more than {max_bytes / 2**20:,.0f} MiB ({total / 2**20:,.0f} MiB so far)"
    )


def _tar_stream(archive: Path) -> BinaryIO:
    with archive.open("rb") as f:
        magic = f.read(6)
    for prefix, opener in _COMPRESSED:
        if magic.startswith(prefix):
            return opener(archive, "rb")
    return archive.open("rb")


def _check_tar_headers(archive: Path, max_bytes: int, max_members: int) -> None:
    """Walk the raw 512-byte headers before tarfile does: a PAX / GNU long-name header over
    :data:`MAX_TAR_HEADER_BYTES` or more than ``max_members`` members is refused before tarfile reads it whole.
    Stops once the members' data passes ``max_bytes`` (tarfile's size check then refuses)."""
    with _tar_stream(archive) as stream:
        members = data = 0
        while data <= max_bytes:
            block = stream.read(512)
            if len(block) < 512 or not block.strip(b"\0"):
                return
            field = block[124:136]
            # the size: octal text, or GNU base-256 (high bit set) for sizes over 8 GiB
            size = (
                int.from_bytes(field[1:], "big") if field[0] & 0x80 else int(field.strip(b"\0 ") or b"0", 8)
            )
            if block[156:157] in _TAR_LONG_HEADERS:
                if size > MAX_TAR_HEADER_BYTES:
                    raise UserInputError(
                        f"archive {archive.name!r} holds a {size:,}-byte member header (a path and its "
                        f"attributes take a few hundred); at most {MAX_TAR_HEADER_BYTES:,}"
                    )
            else:
                members, data = members + 1, data + size
                if members > max_members:
                    raise UserInputError(f"archive {archive.name!r} has more than {max_members} members")
            skip = -(-size // 512) * 512
            while skip > 0:  # forward through the data (a compressed stream cannot seek)
                skip -= len(stream.read(min(skip, 2**20))) or skip


def _extract_tar(archive: Path, dest: Path, max_bytes: int, max_members: int) -> None:
    try:
        _check_tar_headers(archive, max_bytes, max_members)
    except ValueError as err:  # a size field that is not octal: tarfile names it the same way
        raise tarfile.TarError(f"bad member header ({err})") from err
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


def _zip_directory(archive: Path) -> tuple[int, int]:
    """``(members, bytes)`` of a zip's central directory from its end records, read before zipfile parses the
    directory whole (zip64 records included); ``(0, 0)`` when no end record is found (zipfile says why)."""
    with archive.open("rb") as f:
        f.seek(0, 2)
        end = f.tell()
        f.seek(max(0, end - 65_557))  # the end record (22 bytes) and a comment of at most 65,535
        tail = f.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < 22:
            return 0, 0
        members, size = struct.unpack("<HI", tail[at + 10 : at + 16])
        locator = tail[at - 20 : at] if at >= 20 else b""
        if (members == 0xFFFF or size == 0xFFFFFFFF) and locator[:4] == b"PK\x06\x07":
            (offset,) = struct.unpack("<Q", locator[8:16])
            f.seek(offset)
            record = f.read(56)
            if record[:4] == b"PK\x06\x06" and len(record) == 56:
                members, size = struct.unpack("<QQ", record[32:48])
    return members, size


def _extract_zip(archive: Path, dest: Path, max_bytes: int, max_members: int) -> None:
    members, size = _zip_directory(archive)
    if members > max_members:
        raise UserInputError(f"archive {archive.name!r} has {members} members; at most {max_members}")
    if size > MAX_ZIP_DIRECTORY_BYTES:
        raise UserInputError(
            f"archive {archive.name!r} has a {size / 2**20:,.0f} MiB member list; at most "
            f"{MAX_ZIP_DIRECTORY_BYTES / 2**20:,.0f} MiB"
        )
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
