"""Where and in which precision a model runs: the one home of the device and dtype defaults.

``None`` / ``"auto"`` means CUDA when a GPU is visible, else the CPU; the default dtype is bfloat16 on CUDA (as the
release runs) and float32 on the CPU (bfloat16 matmuls are slow there). Every entry point (API, CLI, bundle, app,
training) resolves through these functions, so a device that does not exist fails the same way everywhere, before
anything is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions: the CLI lists these names (and fails on bad arguments) before torch loads.
DTYPE_NAMES = ("float32", "bfloat16", "float16")
# weight-only quantisation of the LLM (monai_medplib.modeling.quantization does it)
QUANTIZATION_MODES = ("int8", "int4")


def _dtypes() -> dict[str, torch.dtype]:
    import torch

    return {name: getattr(torch, name) for name in DTYPE_NAMES}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` / ``"auto"`` -> ``cuda`` if available else ``cpu``; anything else is checked to exist.

    Raises:
        ValueError: an unknown device string, CUDA asked for without a CUDA device, or a GPU index beyond
            the visible ones.
    """
    import torch

    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device.strip().lower() if isinstance(device, str) else device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a device: use auto, cpu, cuda or cuda:N") from err
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} was requested but no CUDA device is available on this machine"
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {device!r} does not exist: {count} CUDA device(s) are visible")
    elif resolved.type != "cpu":
        raise ValueError(f"device {device!r} is not supported: use auto, cpu, cuda or cuda:N")
    return resolved


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA, float32 elsewhere."""
    import torch

    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device | None = None) -> torch.dtype:
    """A dtype or its name (``"float32"``, ``"bfloat16"``, ``"float16"``); ``None`` -> :func:`default_dtype`.

    Raises:
        ValueError: any other dtype.
    """
    import torch

    if dtype is None:
        return default_dtype(device if device is not None else torch.device("cpu"))
    known = _dtypes()
    if isinstance(dtype, str):
        if dtype not in known:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {list(DTYPE_NAMES)}")
        return known[dtype]
    if dtype not in known.values():
        raise ValueError(f"dtype {dtype} is not supported; use one of {list(DTYPE_NAMES)}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """The name :func:`resolve_dtype` reads back (``torch.bfloat16`` -> ``"bfloat16"``)."""
    names = {v: k for k, v in _dtypes().items()}
    if dtype not in names:
        raise ValueError(f"dtype {dtype} is not supported; use one of {list(DTYPE_NAMES)}")
    return names[dtype]


def resolve_quantization(value: str | None) -> str | None:
    """``None`` / ``"none"`` / ``""`` -> None; ``"int8"`` / ``"int4"`` (any case) -> itself.

    Raises:
        ValueError: any other value, listing the modes.
    """
    if value is None:
        return None
    word = str(value).strip().lower()
    if word in ("", "none"):
        return None
    if word not in QUANTIZATION_MODES:
        raise ValueError(
            f"quantization {value!r} is not supported; use one of {list(QUANTIZATION_MODES)} or none"
        )
    return word
