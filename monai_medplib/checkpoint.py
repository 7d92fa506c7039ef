"""Load and save MedPLIB checkpoints in the release layout (spec 6).

A model directory holds ``config.json`` (release fields), the weights as safetensors (one file, or shards with or
without an index: the release ships safetensors shards with only a ``.bin`` index, so the key -> file map is built
from the safetensors headers) or as ``*.bin`` (read with ``torch.load(weights_only=True)``), and the tokenizer files.
The model is built without allocating weights (parameters on the meta device) and each tensor is read, cast and
assigned in turn, so peak memory stays near one copy of the weights plus the largest tensor.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .config import CLIP_SUBDIR, CONFIG_FILE, MedPLIBConfig
from .devices import dtype_name, resolve_dtype
from .io.atomic import atomic_path, atomic_write_text
from .modeling import placement
from .modeling import quantization as quantizer
from .modeling.medplib import MedPLIBForCausalLM

logger = logging.getLogger(__name__)

CLIP_PREFIX = "model.vision_tower.vision_tower."
SAM_PREFIX = "model.visual_model."
ROUTER_SUFFIX = "deepspeed_moe.gate.wg.weight"
SAFE_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
)
# Buffers some writers save but that are recomputed here (transformers 4.31 saved RoPE inv_freq; older CLIP
# checkpoints carry position_ids; SAM checkpoints may carry pixel_mean/std).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids", "pixel_mean", "pixel_std")


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not match the architecture in its config."""


# ---------------------------------------------------------------------------------------------- reading tensors
def _safetensors_header(f, file: Path) -> tuple[dict[str, Any], int]:
    """The tensor table of an open safetensors file and where its data starts; a truncated or foreign file is a
    ValueError naming it (the library's own errors name neither the file nor the cause)."""
    size = file.stat().st_size
    header_len = int.from_bytes(f.read(8), "little") if size >= 8 else -1
    if not 0 < header_len <= size - 8:
        raise ValueError(f"{file}: not a safetensors file, or a truncated one ({size} bytes)")
    try:
        header = json.loads(f.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        header.pop("__metadata__", None)
        ends = [int(info["data_offsets"][1]) for info in header.values()]
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise ValueError(f"{file}: not a safetensors file, or a corrupt one ({err})") from None
    if ends and 8 + header_len + max(ends) > size:
        raise ValueError(f"{file}: the file ends before its last tensor (truncated checkpoint?)")
    return header, 8 + header_len


def _safetensors_headers(files: list[Path]) -> dict[Path, dict[str, Any]]:
    """Each file's tensor table, read once; a key stored in two files is an error."""
    headers: dict[Path, dict[str, Any]] = {}
    key_to_file: dict[str, Path] = {}
    for file in files:
        with file.open("rb") as f:
            headers[file] = _safetensors_header(f, file)[0]
        for key in headers[file]:
            if key in key_to_file:
                raise CheckpointMismatchError(
                    f"key {key!r} is stored twice: {key_to_file[key].name} and {file.name}"
                )
            key_to_file[key] = file
    return headers


_SAFE_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _iter_safetensors(
    files: list[Path], target_dtype: Callable[[str, torch.dtype], torch.dtype] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Read tensors one at a time with plain reads (not mmap), each straight into its own new tensor.

    ``readinto`` fills the tensor's memory from the file, so a tensor costs exactly its bytes (no temporary
    ``bytes`` copy whose freed heap the allocator keeps), and no loaded tensor keeps a checkpoint file mapped (a
    later save into the same directory would otherwise truncate memory still in use). When ``target_dtype(key,
    stored dtype)`` differs from the stored dtype, the bytes go through one reused scratch buffer and only the
    converted tensor is allocated.
    """
    scratch = torch.empty(0, dtype=torch.uint8)
    for file in files:
        with file.open("rb", buffering=0) as f:
            header, base = _safetensors_header(f, file)
            for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                if info["dtype"] not in _SAFE_DTYPES:
                    raise ValueError(f"{file.name}: tensor {key!r} has unsupported dtype {info['dtype']}")
                stored = _SAFE_DTYPES[info["dtype"]]
                start, end = info["data_offsets"]
                nbytes = math.prod(info["shape"]) * stored.itemsize
                if end - start != nbytes:
                    raise ValueError(
                        f"{file.name}: tensor {key!r} spans {end - start} bytes but shape {info['shape']} "
                        f"{info['dtype']} needs {nbytes}"
                    )
                wanted = stored if target_dtype is None else target_dtype(key, stored)
                if wanted == stored:
                    tensor = torch.empty(info["shape"], dtype=stored)
                    raw = tensor.reshape(-1).view(torch.uint8)
                else:
                    if scratch.numel() < nbytes:
                        scratch = torch.empty(nbytes, dtype=torch.uint8)
                    raw = scratch[:nbytes]
                if nbytes:
                    f.seek(base + start)
                    _read_exactly(f, memoryview(raw.numpy()), file, key)
                if wanted != stored:
                    tensor = raw.view(stored).reshape(info["shape"]).to(wanted)
                yield key, tensor


def _read_exactly(f, buffer: memoryview, file: Path, key: str) -> None:
    done = 0
    while done < len(buffer):
        count = f.readinto(buffer[done:])
        if not count:
            raise ValueError(f"{file.name}: file ends inside tensor {key!r} (truncated checkpoint?)")
        done += count


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) torch files cannot be memory-mapped
        data = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]  # SAM-Med2D style {"model": state_dict, ...}
    if not isinstance(data, dict):
        raise ValueError(f"{file} does not hold a state dict (got {type(data).__name__})")
    return data


def weight_files(path: str | Path) -> list[Path]:
    """Weight files of a model directory (safetensors preferred over ``*.bin``), or ``[path]`` for a file."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    _check_shard_index(path)
    if (path / SAFE_INDEX).is_file():  # the shards it names, not whatever else a folder holds
        return sorted(
            {path / name for name in json.loads((path / SAFE_INDEX).read_text())["weight_map"].values()}
        )
    bins = [f for f in sorted(path.glob("*.bin")) if not f.name.startswith(NOT_WEIGHT_FILES)]
    files = sorted(path.glob("*.safetensors")) or bins or sorted(path.glob("*.pth"))
    if not files:
        raise FileNotFoundError(f"no weights in {path}: expected *.safetensors or *.bin files")
    return files


# .bin files that a Hugging Face Trainer writes beside the weights: pickles of its own, not tensors
NOT_WEIGHT_FILES = ("training_args", "optimizer", "scheduler", "rng_state", "trainer_state")


def _check_shard_index(folder: Path) -> None:
    """Every shard a ``*.index.json`` of ``folder`` names is there (else the error would be thousands of missing
    keys, not the missing file)."""
    for index in sorted(folder.glob("*.index.json")):
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(
                f"{index} is not a shard index (a JSON object with a 'weight_map'): {err}"
            ) from None
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{folder}: {len(missing)} of the {len(shards)} weight files that {index.name} lists are missing: "
                + ", ".join(missing)
            )


def iter_state_dict(
    path: str | Path, target_dtype: Callable[[str, torch.dtype], torch.dtype] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` of every weight file of ``path``, one tensor (safetensors) or one file (.bin) at a time.

    Safetensors tensors are new CPU tensors owned by the caller, already converted to ``target_dtype(key, stored
    dtype)`` when that is given; ``.bin`` tensors are as stored and may view a memory-mapped file (copy them
    before keeping them).
    """
    files = weight_files(path)
    safetensors_files = [f for f in files if f.suffix == ".safetensors"]
    if safetensors_files:
        _safetensors_headers(safetensors_files)  # fail early on a key stored twice
        yield from _iter_safetensors(safetensors_files, target_dtype)
        return
    seen: set[str] = set()
    for file in files:
        data = _torch_load(file)
        for key, tensor in data.items():
            if key in seen:
                raise CheckpointMismatchError(f"key {key!r} is stored twice (again in {file.name})")
            seen.add(key)
            yield key, tensor
        del data


def _reads_safetensors(path: str | Path) -> bool:
    """Whether :func:`iter_state_dict` reads ``path`` from safetensors (fresh tensors) rather than ``.bin``."""
    return any(f.suffix == ".safetensors" for f in weight_files(path))


def _component_state(path: str | Path, prefix: str, strip: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Keys of a separate CLIP / SAM checkpoint mapped into the MedPLIB namespace."""
    for key, tensor in iter_state_dict(path):
        if key.startswith(strip):
            yield prefix + key, tensor


# ---------------------------------------------------------------------------------------------- building
@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (no memory, no init cost) while buffers stay real.

    Buffers (RoPE frequencies, CLIP position ids, SAM pixel statistics) are mostly not in checkpoints and are
    cheap, so they are computed normally.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def build_empty_model(config: MedPLIBConfig, attn_implementation: str = "sdpa") -> MedPLIBForCausalLM:
    """The architecture of ``config`` with parameters on the meta device."""
    with _parameters_on_meta():
        return MedPLIBForCausalLM(config, attn_implementation=attn_implementation)


def _first(items: list[str], sep: str, shown: int = 20) -> str:
    """The first ``shown`` of ``items``, and how many more (a 7B checkpoint can miss thousands of keys)."""
    more = f"{sep}... and {len(items) - shown} more" if len(items) > shown else ""
    return sep.join(items[:shown]) + more


def _check_keys(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> None:
    """Every key of the architecture is found once with its shape (shapes from the files' headers)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(
        f"{k}: checkpoint {tuple(found[k])} vs model {tuple(expected[k])}"
        for k in set(found) & set(expected)
        if tuple(found[k]) != tuple(expected[k])
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: " + _first(missing, ", "))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: " + _first(unexpected, ", "))
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches: " + _first(wrong, "; "))
    if problems:
        raise CheckpointMismatchError(
            "checkpoint does not match the MedPLIB architecture:\n" + "\n".join(problems)
        )


# ---------------------------------------------------------------------------------------------- loading
def _file_shapes(path: str | Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{key: (shape, stored dtype)}`` of a weight directory or file, without reading any tensor (safetensors
    headers; ``.bin`` files are memory-mapped, so only their index is read)."""
    files = weight_files(path)
    safetensors_files = [f for f in files if f.suffix == ".safetensors"]
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    if safetensors_files:
        for file, header in _safetensors_headers(safetensors_files).items():
            for key, info in header.items():
                if info["dtype"] not in _SAFE_DTYPES:
                    raise ValueError(f"{file.name}: tensor {key!r} has unsupported dtype {info['dtype']}")
                shapes[key] = (tuple(info["shape"]), _SAFE_DTYPES[info["dtype"]])
        return shapes
    for key, tensor in iter_state_dict(path):
        shapes[key] = (tuple(tensor.shape), tensor.dtype)
    return shapes


@dataclass
class _LoadPlan:
    """Which file gives each key, its shape and stored dtype (main checkpoint first; separate CLIP / SAM files
    only fill keys it lacks)."""

    sources: dict[str, tuple[str, Path]] = field(default_factory=dict)  # key -> (source name, path)
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = field(default_factory=dict)

    def add(self, name: str, path: Path, key: str, shape: tuple[tuple[int, ...], torch.dtype]) -> None:
        if key.endswith(_IGNORED_SUFFIXES) or key in self.sources:
            return
        self.sources[key] = (name, path)
        self.shapes[key] = shape


def _plan(
    path: Path, clip_path: str | Path | None, sam_path: str | Path | None, sam_keys: set[str]
) -> _LoadPlan:
    plan = _LoadPlan()
    for key, shape in _file_shapes(path).items():
        plan.add("main", path, key, shape)
    if clip_path is not None:
        for key, shape in _file_shapes(clip_path).items():
            if key.startswith("vision_model."):
                plan.add("clip", Path(clip_path), CLIP_PREFIX + key, shape)
    if sam_path is not None:
        for key, shape in _file_shapes(sam_path).items():
            if key in sam_keys:
                plan.add("sam", Path(sam_path), SAM_PREFIX + key, shape)
    return plan


def _source_tensors(
    name: str, path: Path, target_dtype: Callable[[str, torch.dtype], torch.dtype]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one source under MedPLIB keys (target dtypes apply to the main checkpoint's safetensors)."""
    if name == "main":
        yield from iter_state_dict(path, target_dtype)
    else:
        prefix, strip = (CLIP_PREFIX, "vision_model.") if name == "clip" else (SAM_PREFIX, "")
        yield from _component_state(path, prefix, strip)


def _assign(model: nn.Module, key: str, tensor: torch.Tensor, quantized: bool) -> None:
    """Put ``tensor`` in place of the (meta) parameter or buffer ``key``."""
    module_path, _, name = key.rpartition(".")
    module = model.get_submodule(module_path)
    if name in module._parameters:
        grad = module._parameters[name].requires_grad and not quantized
        module._parameters[name] = nn.Parameter(tensor, requires_grad=grad)
    else:
        module._buffers[name] = tensor


def _unit_bytes(
    model: MedPLIBForCausalLM, plan: _LoadPlan, target_dtype, quantization: str | None, device_type: str
) -> dict[str, int]:
    """Bytes each unit's weights will take once loaded (what an "auto" device map is split by)."""
    sizes = dict.fromkeys(placement.unit_names(model.config.num_hidden_layers), 0)
    for key, (shape, stored) in plan.shapes.items():
        dtype = target_dtype(key, stored)
        if quantization is not None and quantizer.is_quantized_key(key):
            size = quantizer.planned_bytes(shape, quantizer.mode_for_key(key, quantization), device_type)
        else:
            size = math.prod(shape) * dtype.itemsize
        sizes[placement.unit_of_key(key)] += size
    return sizes


def _resolve_placement(
    config: MedPLIBConfig, device: str | torch.device, device_map: str | placement.DeviceMap | None
) -> dict[str, torch.device] | None:
    """One device per unit, checked before anything is read; None for "auto" (decided once sizes are known)."""
    if device_map is None:
        return dict.fromkeys(placement.unit_names(config.num_hidden_layers), torch.device(device))
    if isinstance(device_map, str):
        if device_map.strip().lower() != placement.AUTO:
            raise ValueError(
                f"device_map must be None, 'auto' or a dict of unit -> device, got {device_map!r}"
            )
        return None
    return placement.resolve_device_map(device_map, config.num_hidden_layers)


def _llm_devices(units: dict[str, torch.device]) -> set[torch.device]:
    return {d for unit, d in units.items() if placement.is_llm_unit(unit) and unit != "embed"}


def load_medplib(
    path: str | Path,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    clip_path: str | Path | None = None,
    sam_path: str | Path | None = None,
    attn_implementation: str = "sdpa",
    load_tokenizer: bool = True,
    quantization: str | None = None,
    device_map: str | placement.DeviceMap | None = None,
) -> tuple[MedPLIBForCausalLM, MedPLIBConfig, Any]:
    """Load a release (or :func:`save_medplib`) directory strictly, tensor by tensor.

    Keys and shapes are checked against the architecture from the files' headers first; then each tensor is
    read, cast, moved to its unit's device and (when asked) quantised before the next one is read, so memory
    peaks near the loaded size plus one tensor.

    Args:
        path: model directory (``config.json`` + weights + tokenizer files).
        dtype: float32, bfloat16 or float16 for all floating weights except the MoE routers (kept fp32, as
            DeepSpeed does) and, when quantised, the LLM (which computes in bfloat16).
        device: where the weights go (ignored when ``device_map`` is given).
        clip_path: CLIP weights in the openai layout (``vision_model.*``; a directory or a file) for keys the
            MedPLIB checkpoint lacks.
        sam_path: SAM-Med2D weights (``sam-med2d_b.pth``: ``{"model": state_dict}``) for keys the checkpoint lacks.
            The mask decoder, projector, routers and experts exist only in the MedPLIB checkpoint.
        attn_implementation: "sdpa" or "eager".
        load_tokenizer: also return the :class:`~monai_medplib.tokenization.MedPLIBTokenizer` (None if no
            ``tokenizer.model``).
        quantization: None, ``"int8"`` or ``"int4"``: weight-only quantisation of the LLM's linear layers while
            loading (:mod:`~monai_medplib.modeling.quantization`; needs the ``quant`` extra). Quantised weights
            cannot be saved safely, so this happens at every load; ``model.quantization`` says what was done.
        device_map: None (everything on ``device``), ``"auto"`` (GPUs in order, by bytes, then the CPU) or a
            dict of unit -> device (:mod:`~monai_medplib.modeling.placement`); ``model.placement`` holds the
            result.

    Returns:
        ``(model in eval mode, config, tokenizer or None)``.

    Raises:
        CheckpointMismatchError: listing every missing, unexpected and mis-shaped key in one message.
        ValueError: an unknown quantization, a device map naming a unit or device that does not exist, or a
            quantization this torch / torchao / GPU cannot run (raised before any weight is read).
    """
    path = Path(path)
    dtype = resolve_dtype(dtype)
    quantization = quantizer.resolve_quantization(quantization)
    config = MedPLIBConfig.from_pretrained(path)
    units = _resolve_placement(config, device, device_map)
    if units is not None:
        quantizer.check_quantization(quantization, _llm_devices(units))
    llm_dtype = quantizer.QUANTIZED_LLM_DTYPE if quantization else dtype

    def target_dtype(key: str, stored: torch.dtype) -> torch.dtype:
        if not stored.is_floating_point or key.endswith(_IGNORED_SUFFIXES):
            return stored
        if key.endswith(ROUTER_SUFFIX):  # DeepSpeed keeps the router fp32 whatever the model dtype
            return torch.float32
        return llm_dtype if placement.is_llm_unit(placement.unit_of_key(key)) else dtype

    model = build_empty_model(config, attn_implementation)
    sam_keys = set(model.model.visual_model.state_dict())
    plan = _plan(path, clip_path, sam_path, sam_keys)
    _check_keys(
        {k: tuple(v.shape) for k, v in model.state_dict().items()},
        {k: s for k, (s, _) in plan.shapes.items()},
    )
    if units is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        units = placement.auto_device_map(_unit_bytes(model, plan, target_dtype, quantization, device_type))
        quantizer.check_quantization(quantization, _llm_devices(units))
    summary = quantizer.QuantizationSummary(quantization, llm_dtype) if quantization else None
    for name, source in dict.fromkeys(plan.sources.values()):
        owned = _reads_safetensors(source)
        for key, tensor in _source_tensors(name, source, target_dtype):
            if plan.sources.get(key) != (name, source):
                continue  # ignored, or given by an earlier source
            unit_device = units[placement.unit_of_key(key)]
            quantize = summary is not None and quantizer.is_quantized_key(key)
            # safetensors tensors are fresh and already cast: kept as they are on the CPU (no second copy);
            # .bin tensors may view a memory-mapped file and are copied
            tensor = tensor.to(unit_device, target_dtype(key, tensor.dtype), copy=not owned and not quantize)
            if quantize:
                tensor, kind, note = quantizer.quantize_weight(
                    tensor, quantizer.mode_for_key(key, quantization)
                )
                summary.add(key, tensor, kind, note)
            _assign(model, key, tensor, quantize)
            del tensor
    placement.move_buffers(model, units)
    if device_map is not None:
        model.placement_hooks = placement.attach_device_hooks(model, units)
    model.placement = units
    model.quantization = summary
    if summary is not None and summary.fallbacks:  # never silently: the user asked for another kind
        logger.warning("quantization %s", summary.describe())
    model.eval()
    tokenizer = None
    if load_tokenizer and (path / "tokenizer.model").is_file():
        from .tokenization import MedPLIBTokenizer

        tokenizer = MedPLIBTokenizer.from_pretrained(path)
    return model, config, tokenizer


def resolve_model_path(path: str | Path) -> Path:
    """``"demo"`` -> the embedded demo model's directory; anything else must be an existing model directory.

    Raises:
        FileNotFoundError: the directory does not exist, or the demo model is not part of this installation.
    """
    if str(path) == "demo":
        from .demo_model import DEMO_MODEL_DIR

        path = Path(DEMO_MODEL_DIR)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"the demo model has no weights in this installation ({path} holds no {CONFIG_FILE}); "
                "pass the path of a MedPLIB model directory instead of 'demo'"
            )
        return path
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"MedPLIB model directory not found: {path}")
    return path


# ---------------------------------------------------------------------------------------------- saving
def _rope_inv_freq(config: MedPLIBConfig) -> torch.Tensor:
    dim = config.head_dim
    return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = size.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def release_state_dict(model: MedPLIBForCausalLM) -> dict[str, torch.Tensor]:
    """The state dict in the release key set: ours plus the per-layer ``rotary_emb.inv_freq`` that 4.31 saved."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    inv_freq = _rope_inv_freq(model.config)
    for i in range(model.config.num_hidden_layers):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    return state


def _copy_tokenizer(tokenizer: Any, out_dir: Path) -> None:
    if tokenizer is None:
        return
    if isinstance(tokenizer, (str, Path)):
        src = Path(tokenizer)
        if not (src / "tokenizer.model").is_file():
            raise FileNotFoundError(f"no tokenizer.model in {src}")
        for name in TOKENIZER_FILES:
            if (src / name).is_file() and not (
                (out_dir / name).exists() and (src / name).samefile(out_dir / name)
            ):  # saved back into the folder it was loaded from
                shutil.copyfile(src / name, out_dir / name)
    elif hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out_dir)
    else:
        raise TypeError(
            f"tokenizer must be a directory or have save_pretrained(), got {type(tokenizer).__name__}"
        )


def _remove_stale_weights(out_dir: Path, written: set[str]) -> None:
    """Weight files of an earlier save into ``out_dir`` (a sharded save then an unsharded one, or another shard
    count) that this save did not write: left there, the folder would hold each tensor twice."""
    stale = [
        f for f in out_dir.glob("model*.safetensors") if f.name not in written and _SHARD_NAME.match(f.name)
    ]
    if len(written) == 1:
        stale.append(out_dir / SAFE_INDEX)
    for file in stale:
        file.unlink(missing_ok=True)


_SHARD_NAME = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")


def save_medplib(
    model: MedPLIBForCausalLM,
    config: MedPLIBConfig,
    tokenizer: Any,
    out_dir: str | Path,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write ``model`` in the release layout: config.json, ``vision_tower/config.json``, safetensors, tokenizer.

    Weights go to ``model.safetensors`` or, above ``max_shard_size``, to ``model-0000i-of-0000n.safetensors`` with a
    ``model.safetensors.index.json``. ``tokenizer`` is a directory to copy the tokenizer files from, a tokenizer
    object with ``save_pretrained``, or None.

    Raises:
        ValueError: ``model`` was quantised while loading (its packed weights are not the release layout); nothing
            is written.
    """
    quantization = getattr(model, "quantization", None)
    if quantization is not None:
        raise ValueError(
            f"cannot save a model quantised while loading (quantization={quantization.mode!r}): its weights are "
            "packed for one kernel; save the model loaded without quantization, and quantise it when loading"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = release_state_dict(model)
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.cpu()
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        with atomic_path(out_dir / "model.safetensors") as tmp:
            save_file(shards[0], str(tmp), metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            with atomic_path(out_dir / name) as tmp:
                save_file(shard, str(tmp), metadata=metadata)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_text(out_dir / SAFE_INDEX, json.dumps(index, indent=2))
    _remove_stale_weights(out_dir, {"model.safetensors"} if len(shards) == 1 else set(weight_map.values()))
    release = config.to_release_dict()
    release["torch_dtype"] = dtype_name(model.dtype)
    atomic_write_text(out_dir / CONFIG_FILE, json.dumps(release, indent=2, sort_keys=True))
    clip_dir = out_dir / CLIP_SUBDIR
    clip_dir.mkdir(exist_ok=True)
    clip = {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", **config.clip}
    atomic_write_text(clip_dir / CONFIG_FILE, json.dumps(clip, indent=2, sort_keys=True))
    _copy_tokenizer(tokenizer, out_dir)
    if not (out_dir / "generation_config.json").is_file():
        generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
        generation["pad_token_id"] = config.pad_token_id
        atomic_write_text(out_dir / "generation_config.json", json.dumps(generation, indent=2))
    return out_dir
