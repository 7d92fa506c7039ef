"""Atomic file writes: a reader (a viewer, a PACS upload, a resumed cohort) never sees a half-written file.

Every writer of the project writes to a temporary name in the destination folder and renames it over the final
name only when the file is complete; a crash leaves the previous file intact and no stray temporary behind
(except on a hard kill, which leaves at most one ``.<name>.*.tmp`` file next to the untouched target).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "check_writable_folder"]


def _process_umask() -> int:
    """The process umask. Read from ``/proc`` where there is one: setting it to read it (the portable way) would
    give files that another thread creates in that instant the mode 0666, whatever umask a server runs under."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    umask = os.umask(0o077)  # no /proc: the strictest mask for that instant
    os.umask(umask)
    return umask


def _default_mode() -> int:
    """``0o666`` less the process umask: the mode ``open(path, "w")`` would give (mkstemp gives 0600)."""
    return 0o666 & ~_process_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on error removed.

    The temporary name keeps ``path``'s suffixes (``.nii.gz``, ``.dcm``), so writers that choose a format by
    suffix write the right one. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (flushed to disk before the rename)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def check_writable_folder(folder: str | Path) -> Path:
    """Create ``folder`` and a file in it, now: a run learns that it cannot write its outputs (no permission, a
    read-only mount, a full disk) before its model has run, not after.

    Raises:
        OSError: what the file system said, as it said it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".medplib-write-check-"):
        pass
    return folder
