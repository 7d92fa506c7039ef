"""Run the code blocks of the project's READMEs as written: parse the fenced blocks, turn a shell block into a bash
script (commands that are not run become a note, servers are started until ``/info/`` answers and stopped),
run a Python block in a fresh interpreter, in a workspace that looks like a clone."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")
RUNNABLE = {
    "bash": "shell",
    "sh": "shell",
    "shell": "shell",
    "console": "shell",
    "python": "python",
    "py": "python",
}
# a command that starts a server (it is run until /info/ answers, then stopped)
SERVER = re.compile(r"(medplib serve\b|monailabel(\.main)? start_server\b|adapters\.monailabel\.server\b)")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a document.

    Attributes:
        doc: the document, relative to the repository root.
        line: the line of the opening fence (1-based).
        lang: ``"shell"`` or ``"python"``.
        text: the block's content, its fence's indentation removed.
    """

    doc: str
    line: int
    lang: str
    text: str

    @property
    def id(self) -> str:
        first = next((c for c in commands(self.text) if not c.startswith("#")), self.text.strip())
        return f"{self.doc}:{self.line} {first.split(chr(10))[0][:60]}"


def read_blocks(root: Path, doc: str) -> list[Block]:
    """The runnable blocks (bash / sh / python fences) of ``root / doc`` in order; other fences (json, text,
    none) are data or output examples."""
    lines = (root / doc).read_text().splitlines()
    blocks, open_at, indent, lang, body = [], None, "", "", []
    for number, line in enumerate(lines, start=1):
        match = FENCE.match(line)
        if open_at is None:
            if match:
                open_at, indent, lang, body = number, match["indent"], match["lang"].lower(), []
            continue
        if match and match["lang"] == "" and len(match["indent"]) <= len(indent):
            if lang in RUNNABLE:
                blocks.append(Block(doc, open_at, RUNNABLE[lang], "\n".join(body) + "\n"))
            open_at = None
            continue
        body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
    return blocks


def commands(text: str) -> list[str]:
    """The logical lines of a shell block: backslash continuations joined (kept as written), blank lines dropped."""
    out: list[str] = []
    pending: list[str] = []
    for line in text.splitlines():
        pending.append(line)
        if line.rstrip().endswith("\\"):
            continue
        command = "\n".join(pending).strip()
        pending = []
        if command:
            out.append(command)
    if pending:
        out.append("\n".join(pending).strip())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_port(command: str, port: int) -> str:
    """``command`` without its trailing comment, listening on ``port`` (its own ``--port`` replaced)."""
    lines = command.split("\n")
    lines[-1] = re.sub(r"\s+#\s.*$", "", lines[-1])
    command = "\n".join(lines)
    if re.search(r"--port\s+\d+", command):
        return re.sub(r"--port\s+\d+", f"--port {port}", command)
    return f"{command} --port {port}"


SERVE_CHECK = r"""
serve_check() {  # run a server until /info/ answers (200, or 401 behind a token), then stop it
  local log; log="$(mktemp -p . serve.XXXXXX.log)"
  setsid "$@" > "$log" 2>&1 &
  local pid=$! code
  for _ in $(seq 1 900); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$DOCS_PORT/info/" || true)
    if [ "$code" = 200 ] || [ "$code" = 401 ]; then
      echo "docs: server answered /info/ with $code"; kill -TERM -- -"$pid"; wait "$pid" 2>/dev/null || true
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then echo "docs: the server exited:"; tail -n 40 "$log"; return 1; fi
    sleep 0.5
  done
  echo "docs: no answer from the server"; kill -TERM -- -"$pid"; tail -n 40 "$log"; return 1
}
"""


def shell_script(block: Block, not_run: Mapping[str, str], port: int) -> str:
    """The bash script of a shell block: ``set -e``; each command whose text contains a key of ``not_run`` is
    replaced by a note with its reason; server commands go through ``serve_check`` on ``port``."""
    parts = ["set -eo pipefail", f"export DOCS_PORT={port}", SERVE_CHECK]
    for command in commands(block.text):
        reason = next((why for key, why in not_run.items() if key in command), None)
        if command.startswith("#"):
            parts.append(command)
        elif reason is not None:
            parts.append(f": 'not run: {reason}'")
        elif SERVER.search(command):
            parts.append(f"serve_check {_with_port(command, port)}")
        else:
            parts.append(command)
    return "\n".join(parts) + "\n"


def environment(venv_bin: Path, activated: bool) -> dict[str, str]:
    """The process environment of a block: no project variables; the venv's ``bin`` first on PATH when the block
    is written for an activated environment (bare ``medplib``, ``python``), and absent from PATH otherwise."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MEDPLIB_", "MONAI_LABEL_", "PYTEST_"))
        and k not in ("VIRTUAL_ENV", "PYTHONPATH")
    }
    path = [p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p and Path(p) != venv_bin]
    env["PATH"] = os.pathsep.join(([str(venv_bin)] if activated else []) + path)
    return env


def run(
    argv: Sequence[str], cwd: Path, env: Mapping[str, str], timeout: float
) -> subprocess.CompletedProcess:
    """Run ``argv`` in its own session; on timeout the whole session is killed."""
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        err += f"\ndocs: killed after {timeout:.0f} s"
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


class Server:
    """``medplib serve`` on a free loopback port for blocks that talk to a running server (a context manager)."""

    def __init__(self, venv_bin: Path, studies: Path, cwd: Path, env: Mapping[str, str]) -> None:
        self.port = free_port()
        argv = [str(venv_bin / "medplib"), "serve", "--studies", str(studies), "--port", str(self.port)]
        self.log = cwd / f"server_{self.port}.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                argv, cwd=cwd, env=dict(env), stdout=log, stderr=log, start_new_session=True
            )

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 450
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"medplib serve exited: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/info/", timeout=5) as reply:
                    if reply.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"medplib serve did not answer: {self.log.read_text()[-3000:]}")

    def __exit__(self, *exc: object) -> None:
        os.killpg(self.proc.pid, 15)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)


def clone_like(repo: Path, root: Path, venv: Path) -> None:
    """Make ``root`` look like a clone for the docs: ``.venv`` (the running venv) and copies of ``apps/`` and
    ``bundle/`` (servers and bundle runs write into them, as they would in a clone)."""
    (root / ".venv").symlink_to(venv, target_is_directory=True)
    skip = shutil.ignore_patterns("eval", "models", "logs", "model", "bin", "data", "__pycache__")
    shutil.copytree(repo / "bundle", root / "bundle", ignore=skip)
    shutil.copytree(repo / "apps", root / "apps", ignore=skip)


def files_under(folder: Path) -> Iterator[Path]:
    return (p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def python_argv(script: Path) -> list[str]:
    return [sys.executable, str(script)]
