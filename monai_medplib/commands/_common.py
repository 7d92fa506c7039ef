"""Arguments shared by the model-running sub-commands, and the checks every command runs before loading a model.

Order of work in a command: cheap checks of what the user typed (paths exist, ``--out`` is a folder, the model
folder exists), then the device (imports torch), then the inputs are read, and only then the model is loaded, so a
mistake is reported in about the time Python takes to start.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..devices import DTYPE_NAMES, QUANTIZATION_MODES
from ..pipeline.options import MAX_NEW_TOKENS
from ..user_input import USER_ERRORS, UserInputError


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="demo", help="MedPLIB model directory, or 'demo' (default)")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    group.add_argument(
        "--dtype", choices=DTYPE_NAMES, default=None, help="default: float32 on CPU, bfloat16 on CUDA"
    )
    group.add_argument(
        "--template",
        default="vicuna_v1",
        choices=("vicuna_v1", "llava_v1"),
        help="conversation template: vicuna_v1 (the release's evaluation; default, and what the demo figures were "
        "measured with) or llava_v1 (the release's training template, which training uses)",
    )
    group.add_argument(
        "--quantization",
        type=str.lower,  # any case, as the API, the bundle and the app take it
        choices=("none", *QUANTIZATION_MODES),
        default=None,
        help="quantise the LLM's linear layers while loading (needs the quant extra; the LLM then runs in "
        "bfloat16); default: none",
    )
    group.add_argument(
        "--device-map",
        default=None,
        help='instead of --device: "auto" (GPUs in order, then the CPU) or a JSON object of unit -> device, '
        'e.g. \'{"vision": "cuda:0", "sam": "cuda:0", "seg_head": "cuda:0", "embed": "cuda:0", '
        '"layers.0-15": "cuda:0", "layers.16-31": "cuda:1", "head": "cuda:1"}\'',
    )


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation (default: greedy, as the official evaluation)")
    group.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS["image"])
    group.add_argument("--temperature", type=float, default=0.0, help="< 1e-4 means greedy")
    group.add_argument("--seed", type=int, default=None, help="seed for sampling")


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed}


def check_model_folder(args: argparse.Namespace) -> None:
    """The model folder exists (``demo`` is resolved when loading); no import."""
    if str(args.model) != "demo" and not Path(args.model).is_dir():
        what = "a file" if Path(args.model).exists() else "not found"
        raise UserInputError(f"--model {args.model}: {what}; give a MedPLIB model folder or 'demo'")


def check_device(args: argparse.Namespace) -> None:
    """The device (or every device of ``--device-map``) exists (imports torch: run it after the checks that need
    no library); ``--device-map`` becomes ``"auto"`` or a dict."""
    from ..devices import resolve_device

    device_map = getattr(args, "device_map", None)
    if device_map is None:
        resolve_device(args.device)
        return
    if args.device is not None:
        raise UserInputError("give --device or --device-map, not both")
    if device_map.strip().lower() == "auto":
        args.device_map = "auto"
        return
    try:
        parsed = json.loads(device_map)
    except json.JSONDecodeError as err:
        raise UserInputError(
            f"--device-map must be auto or a JSON object of unit -> device ({err})"
        ) from None
    if not isinstance(parsed, dict) or not parsed:
        raise UserInputError(
            f"--device-map must be auto or a JSON object of unit -> device, got {device_map!r}"
        )
    for unit, device in parsed.items():
        if device is None or isinstance(device, bool):  # resolve_device would read null as "auto"
            raise UserInputError(
                f"--device-map {unit}: {device!r} is not a device; name one (cpu, cuda:0, ...)"
            )
        try:
            resolve_device(f"cuda:{device}" if isinstance(device, int) else device)
        except (ValueError, TypeError) as err:
            raise UserInputError(f"--device-map {unit}: {err}") from None
    args.device_map = parsed


def require_path(path: str | Path, option: str = "") -> Path:
    """``path`` exists (a file or a folder); no import."""
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{option + ' ' if option else ''}{path}: no such file or folder")
    return path


# (folder, topmost folder check_out_dir created for it), for out_dirs_removed_on_failure
_CREATED_OUT_DIRS: list[tuple[Path, Path]] = []


def check_out_dir(path: str | Path, option: str = "--out") -> Path:
    """``path`` is a folder or can become one (no file in the way, here or above), and a file can be written in it:
    the folder is created here, before any model runs (and removed again by :func:`out_dirs_removed_on_failure`
    when the command fails later with nothing written)."""
    from ..io.atomic import check_writable_folder

    path = Path(path)
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            raise UserInputError(f"{option} {path}: {part} is a file; give a folder")
    missing = [part for part in (path, *path.parents) if not part.exists()]
    try:
        folder = check_writable_folder(path)
    except OSError as err:
        raise UserInputError(f"{option} {path}: cannot write there ({err.strerror or err})") from None
    if missing:
        _CREATED_OUT_DIRS.append((path, missing[-1]))
    return folder


@contextmanager
def out_dirs_removed_on_failure() -> Iterator[None]:
    """Around a command: when it fails, remove the folders :func:`check_out_dir` created for it that are still
    empty (a command refused after its checks leaves no empty folder behind). A folder that holds anything is kept,
    and so is every folder above it."""
    start = len(_CREATED_OUT_DIRS)
    try:
        yield
    except BaseException:
        for folder, top in reversed(_CREATED_OUT_DIRS[start:]):
            for part in (folder, *folder.parents):
                try:
                    part.rmdir()
                except OSError:  # not empty (or gone): what is above it stays
                    break
                if part == top:
                    break
        raise
    finally:
        del _CREATED_OUT_DIRS[start:]


def check_out_file(path: str | Path, option: str = "--out") -> Path:
    """``path`` can be written as a file (not a folder, no file in the way above it)."""
    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"{option} {path} is a folder; give a file name")
    check_out_dir(path.parent, option)
    return path


def check_outputs_spare_inputs(source: str | Path, outputs: dict[str, str | Path]) -> None:
    """No output replaces the input or another output, and none goes into an input folder (a DICOM series, whose
    folder every later read takes as a whole): each is refused naming its option, before any model runs.

    Args:
        source: the input file or folder.
        outputs: option (or description) -> the file or folder it writes.
    """
    src = Path(source).resolve()
    seen: dict[Path, str] = {}
    for option, path in outputs.items():
        target = Path(path).resolve()
        if target == src:
            raise UserInputError(f"{option} {path} is the input {source}; give another name")
        if src.is_dir() and src in target.parents:
            raise UserInputError(f"{option} {path} is inside the input folder {source}; write it elsewhere")
        if target in seen:
            raise UserInputError(f"{option} {path} is also {seen[target]}; give each output its own name")
        seen[target] = option


def load_pipeline(args: argparse.Namespace):
    """``MedPLIBPipeline.from_pretrained`` with the command's model options; a model folder that cannot be read
    (corrupt weights, a damaged config or tokenizer) is reported naming the file."""
    from ..pipeline import MedPLIBPipeline

    try:
        return MedPLIBPipeline.from_pretrained(
            args.model,
            device=args.device,
            dtype=args.dtype,
            template=args.template,
            quantization=getattr(args, "quantization", None),
            device_map=getattr(args, "device_map", None),
        )
    except USER_ERRORS as err:
        if not isinstance(err, json.JSONDecodeError):
            raise
        raise UserInputError(f"--model {args.model}: {_damaged_file(args.model)} ({err})") from None
    except (OSError, RuntimeError, EOFError) as err:
        raise UserInputError(f"--model {args.model}: {_damaged_file(args.model)} ({err})") from None
    except Exception as err:  # safetensors' SafetensorError, sentencepiece and pickle errors
        if type(err).__module__.split(".")[0] in ("safetensors", "sentencepiece", "pickle", "_pickle"):
            raise UserInputError(f"--model {args.model}: {_damaged_file(args.model)} ({err})") from None
        raise


def _damaged_file(model: str | Path) -> str:
    """Which file of a model folder fails to parse (looked for only after loading failed)."""
    from safetensors import safe_open

    from ..checkpoint import resolve_model_path

    folder = resolve_model_path(model)
    for file in sorted(folder.rglob("*")):
        try:
            if file.suffix == ".json":
                json.loads(file.read_text())
            elif file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt"):
                    pass
            elif file.name == "tokenizer.model" and file.stat().st_size == 0:
                raise ValueError("empty file")
        except Exception as err:  # the first file that does not parse is the answer
            return f"{file} is damaged: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return "a file of the model cannot be read"


def text_slug(text: str, limit: int = 40) -> str:
    """A file-name-safe form of a grounding text (``"liver tumour"`` -> ``"liver_tumour"``)."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "text"


def split_texts(values: list[str]) -> list[str]:
    """Grounding texts from the command line: each argument is one text, and an argument of structure names may
    list several separated by commas or semicolons (``"liver, tumour"``); an argument that ends like a sentence
    (``.``, ``?``, ``!``) is one request, commas included."""
    texts: list[str] = []
    for value in values:
        value = value.strip()
        if value.endswith((".", "?", "!")):
            texts.append(value)
        else:
            texts.extend(t.strip() for t in value.replace(";", ",").split(","))
    texts = [t for t in texts if t]
    if not texts:
        raise UserInputError("no text to ground: give a structure name (liver) or a request")
    if len(set(texts)) != len(texts):
        raise UserInputError(f"texts must be distinct (each becomes one label), got {texts}")
    return texts
