"""Training resume (issue 14 point 6): ``train_state.pt`` holds only tensors and plain values and is read with
``torch.load(weights_only=True)``; a resumed run equals an uninterrupted one, and an old-format, damaged or
crafted file is refused with one line naming it (and ``--no-resume``) without running anything in it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_medplib.cli import main
from monai_medplib.training.loop import (
    CHECKPOINT_FILE,
    TrainConfig,
    _set_numpy_rng_state,
    load_train_state,
    save_train_state,
    train,
)
from monai_medplib.user_input import UserInputError
from tests.support.training_helpers import build_tiny_data, tiny_config

STEPS = 4


def _payload_ran(marker: str) -> None:
    """What the crafted pickle calls when it is unpickled: leaves a file behind."""
    Path(marker).write_text("the payload ran")


class _Payload:
    """An object whose unpickling calls :func:`_payload_ran` (what a malicious ``train_state.pt`` does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_payload_ran, (self.marker,))


def _crafted_state(path: Path, marker: Path) -> Path:
    torch.save({"format": 2, "model": _Payload(marker), "step": 1}, path)
    return path


def _tiny_state(path: Path) -> None:
    """A real state of a small model after one AdamW step (non-empty optimiser state)."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    save_train_state(path, model, optimizer, 1, 0.5, [{"step": 1, "loss": 0.25}])


def test_a_saved_state_loads_with_the_safe_unpickler_and_restores_numpy(tmp_path):
    path = tmp_path / CHECKPOINT_FILE
    np.random.seed(3)
    np.random.standard_normal()  # a cached Gaussian: has_gauss = 1 and a float in the state
    expected = np.random.get_state()
    _tiny_state(path)
    state = torch.load(path, map_location="cpu", weights_only=True)  # raises if anything is not safe
    assert state["step"] == 1 and state["history"] == [{"step": 1, "loss": 0.25}]
    assert set(state["optimizer"]["state"][0]) >= {"exp_avg", "exp_avg_sq"}
    assert not (tmp_path / "train_state.tmp").exists()  # written under a temporary name, then renamed
    np.random.seed(99)
    _set_numpy_rng_state(state["rng"]["numpy"])
    restored = np.random.get_state()
    assert restored[0] == expected[0] and np.array_equal(restored[1], expected[1])
    assert restored[1].dtype == np.uint32 and restored[2:] == expected[2:]
    assert load_train_state(path)["step"] == 1


def test_a_crafted_checkpoint_is_refused_and_its_payload_never_runs(tmp_path):
    path = _crafted_state(tmp_path / CHECKPOINT_FILE, tmp_path / "ran")
    with pytest.raises(UserInputError) as err:
        load_train_state(path)
    message = str(err.value)
    assert str(path) in message and "--no-resume" in message and "\n" not in message
    assert "nothing in it was run" in message
    assert not (tmp_path / "ran").exists()
    # the file is a live payload: the unsafe loader the resume used to call would have run it
    torch.load(path, map_location="cpu", weights_only=False)
    assert (tmp_path / "ran").read_text() == "the payload ran"


@pytest.mark.parametrize("kind", ["old_format", "truncated", "text", "not_a_state", "bad_rng"])
def test_old_damaged_or_foreign_states_are_one_clear_line(tmp_path, kind):
    path = tmp_path / CHECKPOINT_FILE
    if kind == "old_format":  # what earlier versions wrote: numpy's RNG state as a tuple holding an ndarray
        torch.save({"model": {}, "step": 1, "rng": {"numpy": np.random.get_state()}}, path)
    elif kind == "truncated":
        _tiny_state(path)
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "not_a_state":
        torch.save({"weight": torch.zeros(2)}, path)  # safe, but no training state
    else:
        _tiny_state(path)
        state = torch.load(path, weights_only=True)
        state["rng"]["numpy"] = {"keys": [1, 2, 3]}
        torch.save(state, path)
    with pytest.raises(UserInputError) as err:
        load_train_state(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "--no-resume" in message and "\n" not in message


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from monai_medplib.training.run import stage_dataset
    from monai_medplib.training.stages import STAGE0

    root = tmp_path_factory.mktemp("resume")
    data, tok_dir, tok = build_tiny_data(root)
    return tok, stage_dataset(STAGE0, data, tok, {"grounding": 2}), STAGE0, data, tok_dir


def _run(tiny, out: Path, stop_at_step: int | None = None, resume: bool = True):
    """Train the tiny model from the same initialisation; returns its parameters, history and log lines."""
    from monai_medplib.data.mecovqa import collate_mecovqa
    from monai_medplib.modeling.medplib import MedPLIBForCausalLM
    from monai_medplib.training.distributed import DistContext

    tok, dataset, stage = tiny[:3]
    torch.manual_seed(0)
    model = MedPLIBForCausalLM(tiny_config(len(tok)))
    cfg = TrainConfig(
        max_steps=STEPS, batch_size=2, lr=3e-3, warmup_ratio=0.0, log_every=1, stop_at_step=stop_at_step
    )
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    lines: list[str] = []
    history = train(
        model, dataset, collate_mecovqa, stage.loss, tok.seg_id, cfg, ctx, out, resume, lines.append
    )
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    return flat, history, lines


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_a_resumed_run_equals_the_uninterrupted_run(tiny, tmp_path):
    torch.set_num_threads(1)
    _seed_all(7)
    full, full_history, _ = _run(tiny, tmp_path / "full")
    full_draws = _draws()

    _seed_all(7)
    _run(tiny, tmp_path / "resumed", stop_at_step=STEPS // 2)
    load_train_state(tmp_path / "resumed" / CHECKPOINT_FILE)  # the safe loader reads what the loop wrote
    _seed_all(12345)  # another process: its generators start elsewhere; the resume must restore them
    resumed, history, lines = _run(tiny, tmp_path / "resumed")

    assert any(line.startswith("resumed from") and f"at step {STEPS // 2}" in line for line in lines)
    assert [row["step"] for row in history] == list(range(1, STEPS + 1))
    assert torch.allclose(resumed, full, atol=1e-6)
    assert [row["loss"] for row in history] == pytest.approx([row["loss"] for row in full_history], abs=1e-5)
    assert _draws() == full_draws  # python, numpy and torch generators continued where the full run's are


def test_resume_refuses_a_crafted_state_in_the_output_folder(tiny, tmp_path):
    out = tmp_path / "stage"
    out.mkdir()
    _crafted_state(out / CHECKPOINT_FILE, tmp_path / "ran")
    with pytest.raises(UserInputError, match="--no-resume"):
        _run(tiny, out)
    assert not (tmp_path / "ran").exists()
    # --no-resume starts over and replaces the file with a safe state
    _run(tiny, out, stop_at_step=1, resume=False)
    assert load_train_state(out / CHECKPOINT_FILE)["step"] == 1
    assert not (tmp_path / "ran").exists()


def test_medplib_train_reports_a_crafted_state_in_one_line(tiny, tmp_path, capsys):
    """The command line: exit code 2, one line naming the file and --no-resume, no traceback, nothing run."""
    tok, data, tok_dir = tiny[0], tiny[3], tiny[4]
    out = tmp_path / "stage0"
    out.mkdir()
    _crafted_state(out / CHECKPOINT_FILE, tmp_path / "ran")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_config(len(tok)).to_release_dict()))
    argv = ["train", "--stage", "stage0", "--data-root", str(data), "--out", str(out), "--steps", "2"]
    code = main([*argv, "--config", str(config), "--tokenizer", str(tok_dir), "--batch-size", "2"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(out / CHECKPOINT_FILE) in err and "--no-resume" in err
    assert not (tmp_path / "ran").exists()


def test_resume_refuses_a_state_saved_for_other_data(tiny, tmp_path):
    """The step counter of a state indexes one sequence of batches: a run over another dataset (here: the grounding
    file once instead of twice) or another batch size must not continue from it."""
    from monai_medplib.data.mecovqa import collate_mecovqa
    from monai_medplib.modeling.medplib import MedPLIBForCausalLM
    from monai_medplib.training.distributed import DistContext
    from monai_medplib.training.run import stage_dataset

    tok, _, stage, data = tiny[:4]
    out = tmp_path / "stage"
    _run(tiny, out, stop_at_step=1)
    saved = load_train_state(out / CHECKPOINT_FILE)["run"]
    smaller = stage_dataset(stage, data, tok, {"grounding": 1})
    assert saved["samples"] == len(tiny[1]) > len(smaller) and saved["batch_size"] == 2
    for dataset, batch_size, what in ((smaller, 2, "samples"), (tiny[1], 3, "batch_size")):
        cfg = TrainConfig(max_steps=STEPS, batch_size=batch_size, lr=3e-3, warmup_ratio=0.0)
        model = MedPLIBForCausalLM(tiny_config(len(tok)))
        ctx = DistContext(0, 1, 0, torch.device("cpu"))
        with pytest.raises(UserInputError, match=f"{what} .*--no-resume") as err:
            train(
                model, dataset, collate_mecovqa, stage.loss, tok.seg_id, cfg, ctx, out, True, lambda _: None
            )
        assert str(out / CHECKPOINT_FILE) in str(err.value)
    assert load_train_state(out / CHECKPOINT_FILE)["step"] == 1  # the refused runs wrote nothing


def test_resume_refuses_a_state_of_another_stage_start_length_or_rate(tiny, tmp_path):
    """A finished state in the output folder must not stand in for a new run from another model: resuming it
    would save the old weights as the new run's (measured before: a run with a new --init resumed at its last step,
    trained nothing and wrote the earlier model again)."""
    from monai_medplib.data.mecovqa import collate_mecovqa
    from monai_medplib.modeling.medplib import MedPLIBForCausalLM
    from monai_medplib.training.distributed import DistContext

    tok, dataset, stage = tiny[:3]
    out = tmp_path / "stage"
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    first = {"stage": "stage0", "init": "/models/a", "grounding_init": ""}

    def run(identity, **settings):
        cfg = TrainConfig(**{"max_steps": 2, "batch_size": 2, "lr": 3e-3, "warmup_ratio": 0.0, **settings})
        model = MedPLIBForCausalLM(tiny_config(len(tok)))
        return train(
            model,
            dataset,
            collate_mecovqa,
            stage.loss,
            tok.seg_id,
            cfg,
            ctx,
            out,
            True,
            lambda _: None,
            identity,
        )

    run(first)
    assert load_train_state(out / CHECKPOINT_FILE)["run"]["init"] == "/models/a"
    refused = [
        ({**first, "init": "/models/b"}, {}, "init /models/a \\(now /models/b\\)"),
        ({**first, "stage": "stage2"}, {}, "stage stage0 \\(now stage2\\)"),
        (first, {"max_steps": 3}, "max_steps 2 \\(now 3\\)"),
        (first, {"lr": 1e-3}, "lr 0.003 \\(now 0.001\\)"),
    ]
    for identity, settings, words in refused:
        with pytest.raises(UserInputError, match=f"{words}.*--no-resume"):
            run(identity, **settings)
    assert run(first)[-1]["step"] == 2  # the same run resumes as before
