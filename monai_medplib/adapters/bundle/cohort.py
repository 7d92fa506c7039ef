"""Cohorts for the MONAI Bundle: collect studies from a folder or a datalist and run them through a
:class:`~monai_medplib.adapters.bundle.runner.BundlePromptRunner`, sharded across ``torch.distributed`` ranks,
skipping finished studies (resumable: same prompt, settings and model, outputs still there) and reporting
unreadable ones without stopping the run; the bundle's ``finalize`` (:meth:`CohortRunner.check`) then makes the
process exit with code 1 when a study failed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ...io.outputs import write_json
from ...user_input import parse_bool
from .errors import StudiesFailed
from .prompts import IMAGE_2D_SUFFIXES, PROMPT_KEYS, VOLUME_SUFFIXES, study_id_of
from .runner import BundlePromptRunner

__all__ = ["CohortReport", "CohortRunner", "collect_studies"]

logger = logging.getLogger(__name__)


def _entries_from_datalist(datalist: Path, key: str, base_dir: Path | None) -> list[dict[str, Any]]:
    if not datalist.is_file():
        raise FileNotFoundError(f"datalist not found: {datalist}")
    content = json.loads(datalist.read_text())
    if isinstance(content, Mapping):
        if key not in content:
            raise ValueError(f"datalist {datalist} has no {key!r} list (keys: {sorted(content)})")
        content = content[key]
    if not isinstance(content, list):
        raise ValueError(f"datalist {datalist}: expected a list of studies, got {type(content).__name__}")
    base = base_dir if base_dir is not None else datalist.parent
    entries = []
    for n, item in enumerate(content):
        entry = (
            {"image": item} if isinstance(item, str) else dict(item) if isinstance(item, Mapping) else None
        )
        if entry is None or not isinstance(entry.get("image"), str | os.PathLike) or not str(entry["image"]):
            raise ValueError(
                f"datalist {datalist}: entry {n} must be a path or a dict with an 'image' path, got {item!r}"
            )
        entry["image"] = os.fspath(entry["image"])
        for k in ("image", "region_mask"):
            if isinstance(entry.get(k), str) and not Path(entry[k]).is_absolute():
                entry[k] = str(base / entry[k])
        entries.append(entry)
    return entries


def _entries_from_folder(folder: Path, exclude: Path | None = None) -> list[dict[str, Any]]:
    if not folder.is_dir():
        raise FileNotFoundError(f"studies folder not found: {folder}")
    entries = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if (
            exclude is not None and path.resolve() == exclude.resolve()
        ):  # the output folder inside the studies
            continue
        if path.is_dir() or path.name.lower().endswith(IMAGE_2D_SUFFIXES + VOLUME_SUFFIXES):
            entries.append({"image": str(path)})
    return entries


def collect_studies(
    datalist: str | os.PathLike | None = None,
    folder: str | os.PathLike | None = None,
    prompt: Mapping[str, Any] | None = None,
    data_list_key: str = "testing",
    base_dir: str | os.PathLike | None = None,
    exclude: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """The studies of a cohort as ``input_dict``s with unique ``id``s.

    Args:
        datalist: a JSON list of studies (paths or dicts with ``image`` and optional prompt keys), or a MONAI
            datalist dict holding such a list under ``data_list_key``; relative paths are taken from
            ``base_dir`` (default: the datalist's folder). Keys that are not prompt keys (e.g. ``label``) are
            dropped.
        folder: alternatively a folder whose files (2D images, volumes) and sub-folders (DICOM series) are the
            studies.
        prompt: the prompt applied to every study (e.g. ``{"text": "Please segment the liver."}``); a study's
            own keys win.
        exclude: a folder that is not a study (the bundle's ``output_dir``, when it lies in the studies folder).

    Raises:
        ValueError: a datalist entry without an image path, or two entries with the same explicit ``id``.
    """
    if (datalist is None) == (folder is None):
        raise ValueError("give exactly one of datalist= (a JSON file) or folder= (a folder of studies)")
    if datalist is not None:
        raw = _entries_from_datalist(
            Path(datalist), data_list_key, None if base_dir is None else Path(base_dir)
        )
    else:
        raw = _entries_from_folder(Path(folder), None if exclude is None else Path(exclude))
    explicit = [entry.get("id") for entry in raw]
    studies = [
        {**dict(prompt or {}), **{k: v for k, v in entry.items() if k in PROMPT_KEYS}} for entry in raw
    ]
    given = [str(i) for i in explicit if i]
    repeated = sorted({i for i in given if given.count(i) > 1})
    if repeated:
        raise ValueError(
            f"datalist: the id(s) {repeated} are given to more than one study; each study needs its own"
        )
    # an id a datalist gives is kept as given; a name taken from a file repeats only by chance and gets the first
    # free "_2", "_3", ...: free of every study's own name too, so "ct.png" next to "ct.nii.gz" and a study "ct_2"
    # does not take "ct_2" (two studies writing one folder)
    names = [str(i) if i else study_id_of(study["image"]) for i, study in zip(explicit, studies)]
    reserved, used = set(names), set(given)
    for study, name, own in zip(studies, names, explicit):
        if own:
            study["id"] = name
            continue
        unique, n = name, 1
        while unique in used or (unique != name and unique in reserved):
            n += 1
            unique = f"{name}_{n}"
        used.add(unique)
        study["id"] = unique
    return studies


@dataclass
class CohortReport:
    """What one cohort run did (gathered over ranks in ``cohort_report.json``)."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    world_size: int = 1


class CohortRunner:
    """Run a :class:`BundlePromptRunner` over many studies, sharded across ``torch.distributed`` ranks.

    Studies are dealt round-robin (``studies[rank::world_size]``); unless the runner's ``overwrite`` is set, a study
    already done with the same prompt, settings and model whose outputs all still exist is skipped (resumable runs);
    a study that fails to read or run is logged and listed in the report, and the run goes on.

    Args:
        runner: the per-study runner (the inference config's ``inferer``).
        studies: ``input_dict``s (see :func:`collect_studies`).
        distributed: join / start the process group from the ``torchrun`` environment (gloo on CPU, nccl on CUDA).
        report_name: report file written by rank 0 into the runner's ``output_dir``.
    """

    def __init__(
        self,
        runner: BundlePromptRunner,
        studies: Sequence[Mapping[str, Any]],
        distributed: bool = False,
        report_name: str = "cohort_report.json",
    ) -> None:
        self.runner = runner
        self.studies = list(studies)
        self.distributed = parse_bool(distributed, "distributed")  # "--distributed false" arrives as text
        self.report_name = report_name
        self.report: dict[str, Any] | None = None

    def run(self) -> dict[str, Any]:
        import torch.distributed as dist

        started_group = False
        if self.distributed and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            device = self.runner.pipeline.device
            backend = "nccl" if device.type == "cuda" else "gloo"
            if backend == "nccl":  # NCCL's collectives run on the current device: each rank's own, not cuda:0
                import torch

                torch.cuda.set_device(device)
            dist.init_process_group(backend=backend)
            started_group = True
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        try:
            mine = self._run_shard(self.studies[rank::world], world)
            reports = [asdict(mine)]
            if world > 1:
                gathered: list[Any] = [None] * world
                dist.all_gather_object(gathered, reports[0])
                reports = gathered
        finally:
            if started_group:
                dist.destroy_process_group()
        merged = {
            "studies": len(self.studies),
            "world_size": world,
            "done": sorted(s for r in reports for s in r["done"]),
            "skipped": sorted(s for r in reports for s in r["skipped"]),
            "failed": sorted((f for r in reports for f in r["failed"]), key=lambda f: f["id"]),
            "seconds_per_rank": [r["seconds"] for r in reports],
        }
        if rank == 0:
            write_json(self.runner.output_dir / self.report_name, merged)
            logger.info(
                "cohort: %d done, %d skipped, %d failed (%d ranks)",
                len(merged["done"]),
                len(merged["skipped"]),
                len(merged["failed"]),
                world,
            )
        self.report = merged
        return merged

    def check(self) -> None:
        """Raise :class:`~monai_medplib.adapters.bundle.errors.StudiesFailed` (exit code 1 under
        ``python -m monai.bundle run``) when the last :meth:`run` had failed studies."""
        if self.report and self.report["failed"]:
            failed = self.report["failed"]
            listed = "; ".join(f"{f['id']}: {f['error']}" for f in failed[:5]) + (
                "; ..." if len(failed) > 5 else ""
            )
            raise StudiesFailed(
                f"{len(failed)} of {self.report['studies']} studies failed ({listed}); "
                f"see {self.runner.output_dir / self.report_name}"
            )

    def _run_shard(self, studies: Sequence[Mapping[str, Any]], world: int) -> CohortReport:
        report, start = CohortReport(world_size=world), time.perf_counter()
        for study in studies:
            name = str(study.get("id") or study_id_of(study.get("image", "?")))
            if not self.runner.overwrite and self.runner.is_done(study):
                report.skipped.append(name)
                continue
            try:
                self.runner(study)
            except Exception as err:  # one bad study must not stop a cohort: report it and go on
                logger.error("%s: failed: %s: %s", name, type(err).__name__, str(err).strip()[:500])
                first_line = (str(err).strip().splitlines() or [""])[0][:500]
                report.failed.append(
                    {
                        "id": name,
                        "image": str(study.get("image")),
                        "error": f"{type(err).__name__}: {first_line}",
                    }
                )
                continue
            report.done.append(name)
        report.seconds = round(time.perf_counter() - start, 3)
        return report


# ------------------------------------------------------------------------------------------ evaluation
