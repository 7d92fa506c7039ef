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
    first = {"stage": "stage0", "init": "/models/a", "grounding_init": "", "freeze": [], "max_length": 2048}

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
        (first, {"warmup_ratio": 0.5}, "warmup_ratio 0.0 \\(now 0.5\\)"),
        ({**first, "freeze": ["^lm_head"]}, {}, "freeze"),
        ({**first, "max_length": 40}, {}, "max_length"),
    ]
    for identity, settings, words in refused:
        with pytest.raises(UserInputError, match=f"{words}.*--no-resume"):
            run(identity, **settings)
    assert run(first)[-1]["step"] == 2  # the same run resumes as before


def _tiny_cli(tiny, tmp_path: Path) -> list[str]:
    tok, data, tok_dir = tiny[0], tiny[3], tiny[4]
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_config(len(tok)).to_release_dict()))
    return [
        "--stage",
        "stage0",
        "--data-root",
        str(data),
        "--config",
        str(config),
        "--tokenizer",
        str(tok_dir),
    ]


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("--steps", "0", "--steps: must be >= 1, got 0"),
        ("--steps", "-2", "--steps: must be >= 1, got -2"),
        ("--batch-size", "0", "--batch-size: must be >= 1, got 0"),
        ("--grad-accum", "0", "--grad-accum: must be >= 1, got 0"),
        ("--log-every", "0", "--log-every: must be >= 1, got 0"),
        ("--threads", "-1", "--threads: must be >= 1, got -1"),
        ("--max-length", "0", "--max-length: must be >= 1, got 0"),
        ("--lr", "inf", "--lr: must be a finite number > 0, got inf"),
        ("--lr", "nan", "--lr: must be a finite number > 0, got nan"),
        ("--save-every", "-1", "--save-every: must be >= 0, got -1"),
    ],
)
def test_a_count_or_rate_out_of_range_is_the_option_s_error(tiny, tmp_path, capsys, option, value, words):
    """Before: --steps 0 was a ZeroDivisionError, --steps -2 trained until killed, --lr inf saved a NaN model."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["train", *_tiny_cli(tiny, tmp_path), "--out", str(out), option, value])
    assert exit_.value.code == 2 and words in capsys.readouterr().err and not out.exists()


def test_the_training_entry_reports_user_errors_in_one_line(tiny, tmp_path, capsys):
    """python -m monai_medplib.training (what torchrun runs) answers as medplib train does: one line, exit 2."""
    from monai_medplib.training.__main__ import main as training_main

    code = training_main(
        [*_tiny_cli(tiny, tmp_path), "--out", str(tmp_path / "o"), "--repeat", "grounding=0", "--steps", "1"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "bad --repeat 'grounding=0': expected TASK=N with N >= 1" in err
    assert training_main(["--stage", "stage2", "--data-root", str(tmp_path / "nowhere"), "--out", "o"]) == 2


def test_a_non_finite_loss_stops_the_stage_before_it_saves(tiny, tmp_path):
    """A learning rate that blows the weights up (here 1e30) used to end with a NaN model written as the stage's."""
    from monai_medplib.data.mecovqa import collate_mecovqa
    from monai_medplib.modeling.medplib import MedPLIBForCausalLM
    from monai_medplib.training.distributed import DistContext

    tok, dataset, stage = tiny[:3]
    torch.manual_seed(0)
    model = MedPLIBForCausalLM(tiny_config(len(tok)))
    cfg = TrainConfig(max_steps=6, batch_size=2, lr=1e30, warmup_ratio=0.0, grad_clip=1e30, log_every=1)
    out = tmp_path / "blown"
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    with pytest.raises(
        ValueError, match=r"step \d: the loss or its gradient is not finite .*try a lower --lr"
    ):
        train(model, dataset, collate_mecovqa, stage.loss, tok.seg_id, cfg, ctx, out, True, lambda _: None)
    assert not (out / CHECKPOINT_FILE).exists()


def test_damaged_training_files_name_the_file_and_the_entry(tiny, tmp_path):
    """A damaged JSON, an image or mask that is not a picture, or a question without an answer: each is one error
    naming the file (and the entry), not a PIL traceback mid-training or a silently ignored sample."""
    import shutil

    from monai_medplib.data.mecovqa import MeCoVQADataset, read_mecovqa
    from monai_medplib.training.run import TASK_FILES, stage_dataset
    from monai_medplib.training.stages import STAGE0

    tok, data = tiny[0], tiny[3]
    root = tmp_path / "data"
    shutil.copytree(data, root)
    closed = root / TASK_FILES["closed"]
    entries = json.loads(closed.read_text())
    closed.write_text(closed.read_text()[:40])
    with pytest.raises(ValueError, match=f"{closed}: not valid JSON"):
        read_mecovqa(closed, root)
    unanswered = [dict(entries[0], conversations=entries[0]["conversations"][:1]), *entries[1:]]
    closed.write_text(json.dumps(unanswered))
    with pytest.raises(ValueError, match=f"entry {entries[0]['id']!r} has a question without an answer"):
        stage_dataset(STAGE0, root, tok, {})
    closed.write_text(json.dumps(entries))
    records = read_mecovqa(closed, root)
    records[0].image.write_text("garbage")
    with pytest.raises(
        ValueError, match=f"entry {records[0].id!r}: {records[0].image} is not a readable image"
    ):
        MeCoVQADataset(records, tok)[0]
    shutil.copyfile(data / records[0].image.relative_to(root), records[0].image)
    grounding = read_mecovqa(root / TASK_FILES["grounding"], root)
    record = next(r for r in grounding if r.mask_paths)
    record.mask_paths[0].write_bytes(b"\\x89PNG garbage")
    with pytest.raises(
        ValueError, match=f"entry {record.id!r}: {record.mask_paths[0]}: not a readable image"
    ):
        MeCoVQADataset([record], tok)[0]


def test_a_stage_never_writes_over_its_starting_model(tmp_path):
    """Re-running a stage from its own output (--init OUT/hf --out OUT) overwrote the starting model, then failed."""
    from monai_medplib.training.run import StageRun, check_out_spares_init

    def stage(out, init):
        return StageRun("stage2", tmp_path / "data", out, TrainConfig(), init=init)

    for out, init in ((tmp_path / "w", tmp_path / "w" / "hf"), (tmp_path / "m", tmp_path / "m")):
        with pytest.raises(ValueError, match=f"out_dir {out} would write its model over the init model"):
            check_out_spares_init(stage(out, init))
    check_out_spares_init(stage(tmp_path / "stage3", tmp_path / "stage2" / "hf"))  # the usual chain
