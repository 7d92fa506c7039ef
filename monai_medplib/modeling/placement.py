"""Placing a MedPLIB model's parts on several devices (``device_map``): the units, the map's checks, the "auto"
split by bytes, and the hooks that move each unit's inputs to its device.

Units (the names a ``device_map`` uses): ``vision`` (CLIP tower, projector, region adapter), ``sam``
(SAM-Med2D), ``seg_head`` (``text_hidden_fcs``), ``embed`` (token embeddings and RoPE), ``layers.{i}`` (each LLM
decoder layer, its MoE and KV-cache slot) and ``head`` (final norm and ``lm_head``). A map is a dict from unit
names to devices; ``layers`` names every layer and ``layers.A-B`` a range (both ends included), e.g.
``{"vision": "cuda:0", "sam": "cuda:0", "seg_head": "cuda:0", "embed": "cuda:0", "layers.0-15": "cuda:0",
"layers.16-31": "cuda:1", "head": "cuda:1"}``. A unit on ``"cpu"`` computes on the CPU (offloading without
streaming weights).

Each unit's entry modules get a forward pre-hook moving the tensors among their arguments to the unit's device.
The KV cache of a layer is created from that layer's keys, so it lives where the layer does; the model returns
hidden states and logits on the device of its input embeddings (the ``embed`` unit).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..devices import resolve_device

# unit -> the module paths it owns (their state-dict keys start with "<path>.")
_FIXED_UNITS: dict[str, tuple[str, ...]] = {
    "vision": ("model.vision_tower", "model.mm_projector", "model.region_fea_adapter"),
    "sam": ("model.visual_model",),
    "seg_head": ("model.text_hidden_fcs",),
    "embed": ("model.embed_tokens", "model.rotary_emb"),
    "head": ("model.norm", "lm_head"),
}
# modules whose forward is never called as a whole: the hooks go on the parts that are called
_HOOKED_PARTS: dict[str, tuple[str, ...]] = {
    "model.visual_model": ("image_encoder", "prompt_encoder", "mask_decoder"),
    "model.text_hidden_fcs": ("0",),
}
LLM_UNITS = ("embed", "layers", "head")  # the units that compute in the LLM's dtype
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
_LAYER_NAME = re.compile(r"^layers(?:\.(\d+)(?:-(\d+))?)?$")
AUTO = "auto"
AUTO_GPU_RESERVE = 0.15  # share of each GPU's free memory left for activations, the KV cache and CUDA itself

DeviceMap = Mapping[str, str | int | torch.device]

__all__ = [
    "AUTO",
    "DeviceMap",
    "attach_device_hooks",
    "auto_device_map",
    "is_llm_unit",
    "resolve_device_map",
    "unit_names",
    "unit_of_key",
    "unit_placement",
]


def unit_names(num_layers: int) -> list[str]:
    """Every unit of a model with ``num_layers`` decoder layers, in the order data flows through them."""
    return ["vision", "sam", "seg_head", "embed", *(f"layers.{i}" for i in range(num_layers)), "head"]


def is_llm_unit(unit: str) -> bool:
    """Whether ``unit`` belongs to the LLM (embeddings, decoder layers, head)."""
    return unit.split(".")[0] in LLM_UNITS


def unit_of_key(key: str) -> str:
    """The unit a state-dict key belongs to.

    Raises:
        KeyError: a key of no unit.
    """
    match = _LAYER_KEY.match(key)
    if match:
        return f"layers.{match.group(1)}"
    for unit, paths in _FIXED_UNITS.items():
        if any(key.startswith(path + ".") for path in paths):
            return unit
    raise KeyError(f"{key!r} belongs to no unit of the device map")


def _unit_paths(unit: str) -> tuple[str, ...]:
    if unit.startswith("layers."):
        return (f"model.{unit}",)
    return _FIXED_UNITS[unit]


def unit_placement(model: nn.Module, unit: str) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of a unit (its first floating parameter; a quantised weight reports the dtype
    it computes in)."""
    for path in _unit_paths(unit):
        for param in model.get_submodule(path).parameters():
            if param.is_floating_point():
                return param.device, param.dtype
    raise ValueError(f"unit {unit!r} has no floating parameter")


# ---------------------------------------------------------------------------------------------- the map
def _device(value: str | int | torch.device, unit: str) -> torch.device:
    # resolve_device reads None as "auto": in a map, a unit must name its device (null would land on CUDA unasked)
    if isinstance(value, bool) or value is None:
        raise ValueError(f"device_map[{unit!r}]: {value!r} is not a device")
    try:
        device = resolve_device(f"cuda:{value}" if isinstance(value, int) else value)
    except ValueError as err:
        raise ValueError(f"device_map[{unit!r}]: {err}") from None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _expand(name: str, num_layers: int) -> list[str]:
    match = _LAYER_NAME.match(name)
    if not match:
        if name in _FIXED_UNITS:
            return [name]
        raise ValueError(
            f"device_map: unknown unit {name!r}; units are {', '.join(_FIXED_UNITS)}, layers, layers.N, layers.A-B"
        )
    if match.group(1) is None:
        return [f"layers.{i}" for i in range(num_layers)]
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) is not None else first
    if not first <= last < num_layers:
        raise ValueError(f"device_map: {name!r} is outside layers 0-{num_layers - 1}")
    return [f"layers.{i}" for i in range(first, last + 1)]


def resolve_device_map(device_map: DeviceMap, num_layers: int) -> dict[str, torch.device]:
    """Check a user's map and expand it to one device per unit (:func:`unit_names`), before anything is loaded.

    Raises:
        ValueError: an unknown unit or layer range, a unit placed twice or not at all, or a device that does not
            exist here (checked by :func:`~monai_medplib.devices.resolve_device`).
    """
    if not isinstance(device_map, Mapping):
        raise ValueError(f"device_map must be None, 'auto' or a dict of unit -> device, got {device_map!r}")
    placed: dict[str, torch.device] = {}
    for name, value in device_map.items():
        device = _device(value, str(name))
        for unit in _expand(str(name).strip(), num_layers):
            if unit in placed:
                raise ValueError(f"device_map: unit {unit!r} is placed twice")
            placed[unit] = device
    missing = [unit for unit in unit_names(num_layers) if unit not in placed]
    if missing:
        raise ValueError(f"device_map places no device for {_ranges(missing)}; every unit needs one")
    return {unit: placed[unit] for unit in unit_names(num_layers)}


def _ranges(units: list[str]) -> str:
    """``["vision", "layers.3", "layers.4", "layers.5"]`` -> ``"vision, layers.3-5"``."""
    out, run = [], []
    for unit in [*units, ""]:
        if unit.startswith("layers.") and (not run or int(unit[7:]) == run[-1] + 1):
            run.append(int(unit[7:]))
            continue
        if run:
            out.append(f"layers.{run[0]}" + (f"-{run[-1]}" if len(run) > 1 else ""))
            run = []
        if unit.startswith("layers."):
            run = [int(unit[7:])]
        elif unit:
            out.append(unit)
    return ", ".join(out)


def auto_device_map(
    unit_bytes: Mapping[str, int], budgets: Mapping[torch.device | str, int] | None = None
) -> dict[str, torch.device]:
    """Fill the GPUs in order with the units in data-flow order (the order of ``unit_bytes``), then the CPU.

    Args:
        unit_bytes: bytes each unit's weights will take (from the checkpoint's shapes and the quantisation).
        budgets: bytes each GPU may take, in fill order; default: every visible GPU's free memory less
            :data:`AUTO_GPU_RESERVE`. The CPU takes whatever is left.
    """
    if budgets is None:
        budgets = {}
        for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            free, _ = torch.cuda.mem_get_info(index)
            budgets[torch.device("cuda", index)] = int(free * (1 - AUTO_GPU_RESERVE))
    devices = [torch.device(d) for d in budgets]
    left = [int(budgets[d]) for d in budgets]
    placement: dict[str, torch.device] = {}
    current = 0
    for unit, size in unit_bytes.items():
        while current < len(devices) and size > left[current]:
            current += 1  # never go back: consecutive layers stay together
        if current < len(devices):
            placement[unit] = devices[current]
            left[current] -= size
        else:
            placement[unit] = torch.device("cpu")
    return placement


# ---------------------------------------------------------------------------------------------- hooks
def _mover(device: torch.device):
    def move(value: Any) -> Any:
        return value.to(device) if isinstance(value, torch.Tensor) and value.device != device else value

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return tree_map(move, args), tree_map(move, kwargs)

    return hook


def attach_device_hooks(model: nn.Module, placement: Mapping[str, torch.device]) -> list[Any]:
    """Forward pre-hooks moving each unit's tensor inputs to its device; returns the hook handles."""
    handles = []
    for unit, device in placement.items():
        for path in _unit_paths(unit):
            parts = _HOOKED_PARTS.get(path, ("",))
            for part in parts:
                module = model.get_submodule(f"{path}.{part}" if part else path)
                handles.append(module.register_forward_pre_hook(_mover(device), with_kwargs=True))
    return handles


def move_buffers(model: nn.Module, placement: Mapping[str, torch.device]) -> None:
    """Move every unit's buffers (RoPE frequencies, CLIP positions, SAM statistics) to the unit's device."""
    for unit, device in placement.items():
        for path in _unit_paths(unit):
            for module in model.get_submodule(path).modules():
                for name, buffer in module._buffers.items():
                    if buffer is not None and buffer.device != device:
                        module._buffers[name] = buffer.to(device)


def devices_of(
    placement: Mapping[str, torch.device], units: Iterable[str] | None = None
) -> set[torch.device]:
    """The devices the given units (default: all) are placed on."""
    return {placement[u] for u in (placement if units is None else units)}
