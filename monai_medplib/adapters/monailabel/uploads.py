"""Request bodies, read by the server itself: per-request staging folders and a streaming form reader.

* :class:`Staging`: every request that uploads or produces files gets its own folder under the server's state
  folder (on the studies' file system); the folder goes when the request ends, whatever the outcome, so a
  rejected upload leaves nothing behind. Left-overs of a killed server are swept at the next start.
* :func:`read_form`: ``multipart/form-data`` and url-encoded forms, read as they stream in: file parts go
  straight into the staging folder under the client's (checked) file name, with a byte cap checked while
  reading; text fields must be UTF-8 (no silent Latin-1 fallback). A JSON body gets a message saying what to
  send instead.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from ...user_input import UserInputError
from . import names
from .errors import rejected
from .guard import too_large

logger = logging.getLogger(__name__)

MAX_FIELDS = 64
MAX_FIELD_BYTES = 1024**2  # a params JSON is a few kB; a 1 MB one is not a request
SMALL_FORM_BYTES = 64 * 1024  # a login form
FORM_HINT = "send multipart/form-data (or an url-encoded form) with the JSON options in a 'params' field"


class Staging:
    """Per-request folders under ``root`` (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def new(self) -> Path:
        """A fresh empty folder; the caller removes it with :meth:`remove`."""
        folder = self.root / uuid.uuid4().hex
        folder.mkdir(parents=True, exist_ok=False)
        return folder

    @staticmethod
    def remove(folder: str | Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)

    @contextlib.contextmanager
    def folder(self) -> Iterator[Path]:
        """A folder that exists for the ``with`` block."""
        folder = self.new()
        try:
            yield folder
        finally:
            self.remove(folder)

    def sweep(self) -> int:
        """Remove what a killed server left behind; returns how many entries went."""
        if not self.root.is_dir():
            return 0
        count = 0
        for entry in self.root.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            count += 1
        if count:
            logger.info(f"removed {count} unfinished upload(s) from {self.root}")
        return count


@dataclass(frozen=True)
class UploadedFile:
    """A file part written to the staging folder: the form field, the client's file name, where it is."""

    field: str
    name: str
    path: Path
    size: int


@dataclass
class Form:
    """The text fields (UTF-8) and file parts of a request body."""

    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, list[UploadedFile]] = field(default_factory=dict)

    def file(self, name: str) -> UploadedFile | None:
        """The one file uploaded as ``name`` (None if none; 400 if several)."""
        parts = self.files.get(name, [])
        if len(parts) > 1:
            raise rejected(400, f"{len(parts)} files were uploaded as {name!r}; send one")
        return parts[0] if parts else None


async def read_form(request: Any, folder: Path | None, max_bytes: int, file_fields: frozenset[str]) -> Form:
    """Read ``request``'s body into a :class:`Form`; parts named in ``file_fields`` are written to ``folder``
    (None when the form has no file fields).

    Raises:
        HTTPException: 413 for a body over ``max_bytes``, 415 for a JSON or other non-form body, 400 for a
            malformed form, a field that is not UTF-8, a bad file name or a repeated one.
    """
    content_type = request.headers.get("content-type", "")
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind == "multipart/form-data":
        return await _read_multipart(request, content_type, folder, max_bytes, file_fields)
    if kind == "application/x-www-form-urlencoded":
        return _read_urlencoded(await _read_body(request, min(max_bytes, MAX_FIELD_BYTES * 2)))
    body = await _read_body(request, MAX_FIELD_BYTES)
    if not body.strip():
        return Form()
    if kind.endswith("json"):
        raise rejected(415, f"the request body is JSON; {FORM_HINT}")
    raise rejected(415, f"unsupported request body type {kind or '(none)'!r}; {FORM_HINT}")


def _too_large(limit: int) -> str:
    return too_large(limit) if limit > SMALL_FORM_BYTES else too_large(limit, "the limit of a form")


async def _read_body(request: Any, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise rejected(413, _too_large(limit))
        chunks.append(chunk)
    return b"".join(chunks)


def _text(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise rejected(400, f"form field {name!r} is not UTF-8 text (byte {err.start})") from err


def _read_urlencoded(body: bytes) -> Form:
    try:
        pairs = parse_qsl(body.decode("ascii"), keep_blank_values=True, encoding="utf-8", errors="strict")
    except UnicodeDecodeError as err:
        raise rejected(400, "the url-encoded form is not UTF-8 text") from err
    if len(pairs) > MAX_FIELDS:
        raise rejected(400, f"the form has {len(pairs)} fields; at most {MAX_FIELDS}")
    return Form(fields=dict(pairs))


class _MultipartSink:
    """Callbacks of python-multipart's streaming parser: fields into memory, file parts into ``folder``.
    A callback raises the HTTP answer itself (the parser lets it through)."""

    def __init__(self, folder: Path | None, file_fields: frozenset[str]) -> None:
        self.folder, self.file_fields = folder, file_fields
        self.form = Form()
        self.error: Exception | None = None
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name = ""
        self._filename: str | None = None
        self._buffer: bytearray | None = None
        self._out: Any = None
        self._path: Path | None = None
        self._size = 0
        self._parts = 0

    # header callbacks ----------------------------------------------------------------------------
    def on_part_begin(self) -> None:
        self._headers, self._buffer, self._out, self._path, self._size = {}, None, None, None, 0
        self._parts += 1
        if self._parts > MAX_FIELDS:
            raise rejected(400, f"the form has more than {MAX_FIELDS} parts")

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = _text(options.get(b"name", b""), "(part name)")
        raw_filename = options.get(b"filename")
        self._filename = None if raw_filename is None else _text(raw_filename, f"{self._name} (file name)")
        if self._name in self.file_fields and self.folder is not None:
            try:
                name = names.upload_name(self._filename, self._name)
            except UserInputError as err:
                raise rejected(400, str(err)) from err
            taken = {f.name for parts in self.form.files.values() for f in parts}
            if name in taken:
                raise rejected(400, f"two uploaded files are named {name!r}")
            self._path = self.folder / name
            self._out = open(self._path, "xb")  # noqa: SIM115 - closed in on_part_end / close()
        else:
            self._buffer = bytearray()

    # data callbacks ------------------------------------------------------------------------------
    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        self._size += len(chunk)
        if self._out is not None:
            self._out.write(chunk)
        else:
            if self._size > MAX_FIELD_BYTES:
                raise rejected(413, f"form field {self._name!r} is larger than {MAX_FIELD_BYTES:,} bytes")
            self._buffer += chunk

    def on_part_end(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
            part = UploadedFile(self._name, self._path.name, self._path, self._size)
            self.form.files.setdefault(self._name, []).append(part)
        elif self._buffer is not None:
            self.form.fields[self._name] = _text(bytes(self._buffer), self._name)
            self._buffer = None

    def close(self) -> None:
        if self._out is not None:
            self._out.close()


async def _read_multipart(
    request: Any, content_type: str, folder: Path | None, max_bytes: int, file_fields: frozenset[str]
) -> Form:
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise rejected(400, "multipart/form-data without a boundary")
    sink = _MultipartSink(folder, file_fields)
    callbacks = {
        name: getattr(sink, name)
        for name in (
            "on_part_begin",
            "on_header_field",
            "on_header_value",
            "on_header_end",
            "on_headers_finished",
            "on_part_data",
            "on_part_end",
        )
    }
    from starlette.requests import ClientDisconnect

    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise rejected(413, _too_large(max_bytes))
            parser.write(chunk)
        parser.finalize()
    except FormParserError as err:
        raise rejected(400, f"malformed multipart/form-data body: {err}") from err
    except ClientDisconnect:  # an aborted upload (Slicer closed, network): nobody to answer, nothing to log
        raise rejected(400, "the client went away before its upload ended") from None
    finally:
        sink.close()
    return sink.form
