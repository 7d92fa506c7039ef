"""``medplib serve`` under load (issue 14): cold concurrency and a long soak, reported as ratios.

1. **Cold**: 50 concurrent VQA requests spread over 2 images nobody asked for yet (512 x 512 x 128 CT-like
   int16 NIfTI each), each on its own slice; then 50 more on 50 other slices of the same images, warm (the
   volumes are cached, the slices are new to the model as before: both passes do the same model work).
   Before both, one request on a small third image runs the model once (its first forward pays one-time
   costs that belong to neither pass). Reported: decodes per image (the server's ``/info/`` counts them;
   single-flight means 1.0) and p50 cold / p50 warm. Two images, because the pipeline
   keeps two prepared volumes: with more, requests that alternate between images re-prepare each time, warm
   or cold, and the warm pass is no baseline.
2. **Soak**: 500 requests (the four tasks in turn; every tenth a rejected upload: a text file, a truncated
   volume, a too-large volume, a bad label). Reported: the server's RSS growth from request 50 to request 500
   as a fraction of its RSS at request 50, and the files left in the server's temp folder and staging folder
   (the server runs with its own ``TMPDIR``).

Usage: ``python benchmarks/server_load.py [--requests 500] [--keep DIR]`` (``--requests 0``: the cold phase
only); ~10 minutes on 2 cores. Prints one
line per phase and, last, one JSON object. The server is the shipped demo model on CPU, on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import requests
from common import REPO, synthetic_ct

TOKEN = "benchmark-token-0123456789"
IMAGES = 2  # the pipeline keeps 2 prepared volumes (the app's decoded-volume cache 4): the warm pass must not evict
COLD_REQUESTS = 50
SHAPE = (512, 512, 128)


def write_studies(folder: Path) -> list[str]:
    """``IMAGES`` different CT-like volumes (noise makes each decode real work)."""
    base = synthetic_ct(SHAPE[2], size=SHAPE[0])[0].numpy()
    rng = np.random.default_rng(0)
    ids = []
    for n in range(IMAGES):
        image = (base + rng.normal(0, 20, SHAPE)).astype(np.int16)
        nib.save(nib.Nifti1Image(image, np.diag([0.8, 0.8, 1.5, 1.0])), str(folder / f"ct{n}.nii.gz"))
        ids.append(f"ct{n}")
    small = rng.normal(0, 100, (64, 64, 8)).astype(np.int16)
    nib.save(nib.Nifti1Image(small, np.eye(4)), str(folder / "warmup.nii.gz"))
    return ids


class Server:
    """``python -m monai_medplib.adapters.monailabel.server`` in its own process group, with its own TMPDIR."""

    def __init__(self, studies: Path, tmpdir: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "TMPDIR": str(tmpdir), "MEDPLIB_AUTH_TOKEN": TOKEN, "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "monai_medplib.adapters.monailabel.server", "--studies", str(studies)]
        cmd += ["--model", "demo", "--device", "cpu", "--port", str(port), "--log-level", "warning"]
        self.log = open(tmpdir.parent / "server.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {(tmpdir.parent / 'server.log').read_text()[-3000:]}")
            try:
                probe = urllib.request.Request(
                    self.url + "/info/", headers={"Authorization": f"Bearer {TOKEN}"}
                )
                with urllib.request.urlopen(probe, timeout=5):
                    return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("server did not start")

    def rss(self) -> int:
        proc = psutil.Process(self.process.pid)
        return proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(30)
        self.log.close()


def post(
    url: str, model: str, image: str, params: dict, files: dict | None = None, stages: list | None = None
) -> tuple[int, float]:
    """POST one inference; ``stages`` (when given) gets the server's own latencies of a 200 reply."""
    form = {"params": (None, json.dumps(params)), **(files or {})}
    start = time.perf_counter()
    reply = requests.post(
        f"{url}/infer/{model}",
        params={"image": image, "output": "json"} if image else {"output": "json"},
        files=form,
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=600,
    )
    seconds = time.perf_counter() - start
    if stages is not None and reply.status_code == 200:
        stages.append(reply.json()["latencies"])
    return reply.status_code, seconds


def info(url: str) -> dict:
    return requests.get(url + "/info/", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60).json()


def cold_and_warm(url: str, ids: list[str]) -> dict:
    stages: dict[str, list[dict]] = {"cold": [], "warm": []}

    def one(n: int) -> tuple[int, float]:  # n: 0-49 cold, 64-113 warm (no slice asked about twice)
        phase = "cold" if n < COLD_REQUESTS else "warm"
        return post(
            url,
            "medplib_vqa",
            ids[n % len(ids)],
            {"question": "Which plane is this image?", "slice": n},
            stages=stages[phase],
        )

    status, _ = post(url, "medplib_vqa", "warmup", {"question": "Which plane is this image?", "slice": 4})
    if status != 200:
        raise RuntimeError(f"warm-up request: {status}")
    before = info(url)["medplib"]["volumes_decoded"]
    runs = {}
    for phase, first in (("cold", 0), ("warm", SHAPE[2] // 2)):
        with ThreadPoolExecutor(max_workers=COLD_REQUESTS) as pool:
            results = list(pool.map(one, range(first, first + COLD_REQUESTS)))
        if any(status != 200 for status, _ in results):
            raise RuntimeError(f"{phase}: statuses {[s for s, _ in results]}")
        runs[phase] = [seconds for _, seconds in results]
        decoded = info(url)["medplib"]["volumes_decoded"] - before
        print(
            f"{phase}: p50 {statistics.median(runs[phase]):.2f} s, volumes decoded so far {decoded}",
            flush=True,
        )
    return {
        "decodes_per_image": decoded / len(ids),
        "p50_cold_over_warm": statistics.median(runs["cold"]) / statistics.median(runs["warm"]),
        "p50_cold_s": statistics.median(runs["cold"]),
        "p50_warm_s": statistics.median(runs["warm"]),
        # the server's own split of a request: "pre" = waiting for the decoded, normalised volume
        **{
            f"p50_{stage}_{phase}_s": statistics.median(s[stage] for s in stages[phase])
            for phase in stages
            for stage in ("pre", "infer")
        },
    }


def rejected_upload(n: int, tmp: Path) -> tuple[str, str, dict]:
    """(model, image id, files) of a request the server must refuse."""
    kind = (n // 10) % 4
    if kind == 0:
        return "medplib_vqa", "", {"file": ("notes.nii.gz", b"patient notes, not an image")}
    if kind == 1:
        raw = (tmp / "template.nii.gz").read_bytes()
        return "medplib_vqa", "", {"file": ("cut.nii.gz", raw[: len(raw) // 3])}
    if kind == 2:
        bomb = gzip.compress(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)).to_bytes())
        # a header that claims 2**29 voxels: refused before anything is decoded
        header = bytearray(gzip.decompress(bomb))
        header[42:50] = np.array([1024, 1024, 512, 1], "<i2").tobytes()
        return "medplib_vqa", "", {"file": ("bomb.nii.gz", gzip.compress(bytes(header)))}
    return "medplib_region_vqa", "ct0", {"label": ("scribble.nii.gz", b"not a label")}


def soak(server: Server, ids: list[str], requests_total: int, tmp: Path) -> dict:
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 8), np.int16), np.eye(4)), str(tmp / "template.nii.gz"))
    tasks = [
        ("medplib_vqa", {"question": "Is the liver visible in this image?"}),
        ("medplib_grounding", {"text": "liver"}),
        ("medplib_region_vqa", {"question": "What is this?", "foreground": [[256, 256, 0]]}),
        ("medplib_refine", {"text": "liver", "foreground": [[256, 256, 0]]}),
    ]
    base_rss = None
    statuses: dict[int, int] = {}
    for n in range(requests_total):
        if n == 50:
            base_rss = server.rss()
        if n % 10 == 9:
            model, image, files = rejected_upload(n, tmp)
            status, _ = post(server.url, model, image, {}, files)
            if status < 400:
                raise RuntimeError(f"request {n}: a bad upload was accepted ({status})")
        else:
            model, params = tasks[n % 4]
            k = n % SHAPE[2]
            params = {
                **params,
                "slice": k,
                **({"foreground": [[256, 256, k]]} if "foreground" in params else {}),
            }
            status, _ = post(server.url, model, ids[n % 2], params)
        statuses[status] = statuses.get(status, 0) + 1
        if n % 100 == 99:
            print(
                f"soak: {n + 1} requests, RSS {server.rss() / 2**20:.0f} MiB, statuses {statuses}", flush=True
            )
    time.sleep(1.0)  # responses' clean-up tasks run after the body is sent
    end_rss = server.rss()
    return {
        "rss_growth_fraction": (end_rss - base_rss) / base_rss,
        "statuses": statuses,
        "rss_mib_at_50": base_rss / 2**20,
    }


def leftovers(tmpdir: Path, studies: Path) -> int:
    staging = studies / ".medplib" / "staging"
    found = [p for p in tmpdir.rglob("*") if p.is_file()] + [p for p in staging.rglob("*")]
    for path in found:
        print(f"left behind: {path}")
    return len(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument(
        "--keep", default=None, help="work folder to keep (default: a temporary one, removed)"
    )
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="medplib-server-load-"))
    studies, tmpdir = work / "studies", work / "tmp"
    studies.mkdir(parents=True, exist_ok=True)
    tmpdir.mkdir(exist_ok=True)
    ids = write_studies(studies)
    server = Server(studies, tmpdir, args.port)
    try:
        tmp_files_at_start = leftovers(tmpdir, studies)
        result = {"cold": cold_and_warm(server.url, ids)}
        if args.requests:
            result["soak"] = soak(server, ids, args.requests, work)
            result["soak"]["files_left"] = leftovers(tmpdir, studies) - tmp_files_at_start
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
