"""Two-process DistributedDataParallel training on CPU (gloo): loss goes down, ranks stay in sync, resume continues."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow

STEPS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, root: str, phase: str) -> None:
    from monai_medplib.data.mecovqa import collate_mecovqa
    from monai_medplib.modeling.medplib import MedPLIBForCausalLM
    from monai_medplib.tokenization import MedPLIBTokenizer
    from monai_medplib.training.distributed import cleanup, init_distributed
    from monai_medplib.training.loop import TrainConfig, train
    from monai_medplib.training.run import stage_dataset
    from monai_medplib.training.stages import STAGE0
    from tests.support.training_helpers import tiny_config

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    root_path = Path(root)
    tok = MedPLIBTokenizer.from_pretrained(root_path / "tok")
    torch.manual_seed(0)
    model = MedPLIBForCausalLM(tiny_config(len(tok)))
    dataset = stage_dataset(STAGE0, root_path / "data", tok, {"grounding": 2})
    cfg = TrainConfig(
        max_steps=STEPS,
        batch_size=2,
        lr=3e-3,
        warmup_ratio=0.0,
        log_every=1,
        stop_at_step=STEPS // 2 if phase == "first_half" else None,
    )
    out = root_path / ("full" if phase == "full" else "resumed")
    history = train(
        model, dataset, collate_mecovqa, STAGE0.loss, tok.seg_id, cfg, ctx, out, log=lambda _m: None
    )
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.save({"flat": flat, "history": history}, root_path / f"{phase}_rank{rank}.pt")
    cleanup(ctx)


def _spawn(root: Path, phase: str) -> list[dict]:
    mp.spawn(_worker, args=(2, _free_port(), str(root), phase), nprocs=2, join=True)
    return [torch.load(root / f"{phase}_rank{r}.pt", weights_only=False) for r in range(2)]


def test_two_process_gloo_training_syncs_and_resumes(tmp_path):
    from tests.support.training_helpers import build_tiny_data

    build_tiny_data(tmp_path)
    full = _spawn(tmp_path, "full")
    # DDP keeps the replicas identical: same parameters on both ranks after 8 steps
    assert torch.equal(full[0]["flat"], full[1]["flat"])
    losses = [row["loss"] for row in full[0]["history"]]
    assert len(losses) == STEPS
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    # the logged losses are averaged over ranks, so both ranks log the same numbers
    assert [r["loss"] for r in full[1]["history"]] == losses

    first = _spawn(tmp_path, "first_half")
    assert [row["step"] for row in first[0]["history"]] == list(range(1, STEPS // 2 + 1))
    second = _spawn(tmp_path, "second_half")
    steps = [row["step"] for row in second[0]["history"]]
    assert steps == list(range(1, STEPS + 1))  # history restored, continued from step 5
    # resuming reproduces the uninterrupted run
    assert torch.allclose(second[0]["flat"], full[0]["flat"], atol=1e-5)
    assert torch.equal(second[0]["flat"], second[1]["flat"])
