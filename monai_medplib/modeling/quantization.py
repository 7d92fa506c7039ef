"""Weight-only int8 / int4 quantisation of the LLM's linear layers, one weight at a time (torchao 0.18).

The one home of the rule which weights are quantised, of the kernel checks and of the only ``import torchao`` of
the package (the mode names live in :mod:`monai_medplib.devices`, which the CLI reads before torch loads).

- Quantised: the attention projections ``q/k/v/o_proj``, both experts' ``gate/up/down_proj`` of every MoE layer
  and ``lm_head`` (:func:`is_quantized_key`). Kept as released: the MoE routers (fp32), the token embeddings,
  the norms, CLIP, the projector, the region adapter, ``text_hidden_fcs`` and SAM-Med2D.
- ``int8``: per-row symmetric int8 (torchao ``Int8Tensor``), the same format on the CPU and on CUDA.
- ``int4``: asymmetric int4 in groups of :data:`INT4_GROUP_SIZES` (torchao ``Int4OpaqueTensor`` on the CPU, the
  tile-packed tinygemm format on CUDA). A weight whose ``in_features`` no group size divides is quantised to int8
  instead (reported in :class:`QuantizationSummary`); rows are zero-padded to a multiple of 16 for the CPU kernel
  (the padding is sliced off every output). ``lm_head`` stays int8 in int4 mode (:data:`LM_HEAD_MODE`): the
  logits decide every answer token.
- A quantised LLM computes in :data:`QUANTIZED_LLM_DTYPE` (bfloat16): with float32 activations both CPU kernels
  are 2-16x slower. CLIP, SAM-Med2D and the heads keep the dtype the user asked for.

There is no safe file format for these weights (torchao's safetensors support is a prototype and lacks the CPU
int4 format; ``torch.save`` is a pickle), so a model is quantised each time it is loaded, from its release
weights.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn

from ..devices import QUANTIZATION_MODES, resolve_quantization

TORCHAO_VERSION = "0.18.0"
INSTALL_HINT = "pip install 'monai-medplib[quant]'"
QUANTIZED_LLM_DTYPE = torch.bfloat16
INT4_GROUP_SIZES = (128, 64, 32)  # the first that divides in_features is used
INT4_ROW_MULTIPLE = 16  # torch's CPU int4 packing needs out_features % 16 == 0
LM_HEAD_MODE = {"int8": "int8", "int4": "int8"}
# Rows quantised per step: the float temporaries of one step stay near one block of the weight.
ROW_BLOCK = 1024
# torch kernels each mode needs, by device type (checked before anything is loaded)
REQUIRED_OPS = {
    ("int4", "cpu"): ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"),
    ("int4", "cuda"): ("_convert_weight_to_int4pack", "_weight_int4pack_mm"),
    ("int8", "cpu"): (),
    ("int8", "cuda"): (),
}
INT4_CUDA_MIN_CAPABILITY = (8, 0)
# Rows up to which the opt-in int8 decode kernel (:func:`use_int8_decode_kernel`) replaces torchao's matmul.
INT8_DECODE_MAX_ROWS = 32

_QUANTIZED_WEIGHT = re.compile(
    r"^(model\.layers\.\d+\.(self_attn\.[qkvo]_proj"
    r"|mlp\.deepspeed_moe\.experts\.deepspeed_experts\.\d+\.(gate|up|down)_proj)|lm_head)\.weight$"
)

__all__ = [
    "INSTALL_HINT",
    "QUANTIZATION_MODES",
    "QUANTIZED_LLM_DTYPE",
    "QuantizationSummary",
    "QuantizationUnavailableError",
    "check_quantization",
    "is_quantized_key",
    "mode_for_key",
    "planned_bytes",
    "quantize_model",
    "quantize_weight",
    "resolve_quantization",
    "tensor_bytes",
    "use_int8_decode_kernel",
]


class QuantizationUnavailableError(ValueError):
    """The quantisation asked for cannot run here (torchao missing or another version, a kernel missing)."""


def is_quantized_key(key: str) -> bool:
    """Whether the state-dict ``key`` is a weight that is quantised (LLM attention / expert linears, lm_head).

    >>> is_quantized_key("model.layers.3.self_attn.q_proj.weight"), is_quantized_key("model.layers.3.mlp.deepspeed_moe.gate.wg.weight")
    (True, False)
    """
    return bool(_QUANTIZED_WEIGHT.match(key))


def mode_for_key(key: str, mode: str) -> str:
    """The mode a quantised ``key`` gets when ``mode`` is asked for (lm_head: :data:`LM_HEAD_MODE`)."""
    return LM_HEAD_MODE[mode] if key == "lm_head.weight" else mode


# ---------------------------------------------------------------------------------------------- torchao
@functools.cache
def load_torchao() -> SimpleNamespace:
    """The torchao classes this module uses, imported once (the package quietens torchao's import-time log).

    Raises:
        QuantizationUnavailableError: torchao is missing or is not version 0.18 (its int4 API moves every release).
    """
    try:
        import torchao
        from torchao.prototype.quantization.int4 import Int4OpaqueTensor
        from torchao.quantization.granularity import PerRow
        from torchao.quantization.quantize_.workflows.int4.int4_tile_packed_to_4d_tensor import (
            Int4TilePackedTo4dTensor,
        )
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor
    except ImportError as err:
        raise QuantizationUnavailableError(
            f"quantization needs torchao {TORCHAO_VERSION}, which is not installed ({err}): {INSTALL_HINT}"
        ) from None
    version = torchao.__version__.split("+")[0]
    if version.split(".")[:2] != TORCHAO_VERSION.split(".")[:2]:
        raise QuantizationUnavailableError(
            f"quantization needs torchao {TORCHAO_VERSION}, found {torchao.__version__}: {INSTALL_HINT}"
        )
    return SimpleNamespace(
        Int8Tensor=Int8Tensor,
        PerRow=PerRow,
        Int4OpaqueTensor=Int4OpaqueTensor,
        Int4TilePackedTo4dTensor=Int4TilePackedTo4dTensor,
    )


def check_quantization(mode: str | None, devices: Iterable[torch.device | str]) -> None:
    """Fail before loading when ``mode`` cannot run on every device of ``devices`` (the LLM's devices).

    Raises:
        QuantizationUnavailableError: naming what is missing: torchao (and the extra that installs it), a
            torch kernel, or the GPU generation int4 needs.
    """
    if mode is None:
        return
    load_torchao()
    for device in {torch.device(d) for d in devices}:
        if device.type not in ("cpu", "cuda"):
            raise QuantizationUnavailableError(
                f"quantization={mode} runs on cpu and cuda devices, not {device}"
            )
        missing = [op for op in REQUIRED_OPS[(mode, device.type)] if not hasattr(torch.ops.aten, op)]
        if missing:
            raise QuantizationUnavailableError(
                f"quantization={mode} on {device.type} needs the torch kernel(s) "
                f"{', '.join('aten.' + op for op in missing)}, which torch {torch.__version__} lacks"
            )
        if mode == "int4" and device.type == "cuda":
            capability = torch.cuda.get_device_capability(device)
            if capability < INT4_CUDA_MIN_CAPABILITY:
                raise QuantizationUnavailableError(
                    f"quantization=int4 on {device} needs a GPU of compute capability "
                    f"{'.'.join(map(str, INT4_CUDA_MIN_CAPABILITY))} or newer, this one is "
                    f"{'.'.join(map(str, capability))}; use int8"
                )


# ---------------------------------------------------------------------------------------------- one weight
def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a (possibly torchao-quantised) tensor really holds: its inner tensors for a quantised one."""
    if type(tensor) in (torch.Tensor, nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return tensor.numel() * tensor.element_size()
    names, _ = tensor.__tensor_flatten__()
    return sum(tensor_bytes(getattr(tensor, name)) for name in names if getattr(tensor, name) is not None)


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc only): the row blocks' temporaries otherwise stay resident."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _row_blocks(rows: int) -> Iterator[slice]:
    for start in range(0, rows, ROW_BLOCK):
        yield slice(start, min(start + ROW_BLOCK, rows))


def _int8(weight: torch.Tensor) -> torch.Tensor:
    ao = load_torchao()
    rows, cols = weight.shape
    qdata = torch.empty(rows, cols, dtype=torch.int8, device=weight.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=weight.device)
    zero = torch.empty(rows, 1, dtype=torch.int8, device=weight.device)
    for block in _row_blocks(rows):
        part = ao.Int8Tensor.from_hp(weight[block], ao.PerRow())
        qdata[block], scale[block], zero[block] = part.qdata, part.scale, part.zero_point
        del part
    return ao.Int8Tensor(qdata, scale, [1, cols], weight.dtype, zero_point=zero)


def _int4_cpu(weight: torch.Tensor, group: int) -> torch.Tensor:
    ao = load_torchao()
    rows, cols = weight.shape
    padded = -(-rows // INT4_ROW_MULTIPLE) * INT4_ROW_MULTIPLE
    qdata = scale_zero = None
    for block in _row_blocks(padded):
        part_weight = weight[block.start : min(block.stop, rows)]
        if (
            part_weight.shape[0] < block.stop - block.start
        ):  # the last block: zero rows up to the multiple of 16
            part_weight = torch.cat([part_weight, part_weight.new_zeros(block.stop - rows, cols)])
        part = ao.Int4OpaqueTensor.from_hp(part_weight, [1, group])
        if qdata is None:
            qdata = part.qdata.new_empty(padded, *part.qdata.shape[1:])
            scale_zero = part.scale_and_zero.new_empty(part.scale_and_zero.shape[0], padded, 2)
        qdata[block], scale_zero[:, block] = part.qdata, part.scale_and_zero
        del part, part_weight
    return ao.Int4OpaqueTensor(qdata, scale_zero, [1, group], torch.Size([rows, cols]))


def _int4_cuda(weight: torch.Tensor, group: int) -> torch.Tensor:
    # the tile-packed format pads and packs the whole matrix at once (on the GPU); bfloat16 only
    return load_torchao().Int4TilePackedTo4dTensor.from_hp(weight.to(torch.bfloat16), [1, group])


def int4_group_size(in_features: int) -> int | None:
    """The int4 group size for a weight of ``in_features`` columns, or None when no supported size divides it."""
    return next((g for g in INT4_GROUP_SIZES if in_features % g == 0), None)


def planned_bytes(shape: tuple[int, ...], mode: str, device_type: str = "cpu") -> int:
    """Bytes :func:`quantize_weight` will produce for a weight of ``shape`` (computed before loading, to split
    an "auto" device map; equal to :func:`tensor_bytes` of the result on the CPU, an estimate for CUDA int4)."""
    rows, cols = shape
    group = int4_group_size(cols) if mode == "int4" else None
    if group is None:  # int8: int8 values, fp32 scale and int8 zero point per row
        return rows * cols + rows * (4 + 1)
    if device_type == "cuda":  # the tile-packed format pads in_features to 1024 and rows to 8
        rows, cols = -(-rows // 8) * 8, -(-cols // 1024) * 1024
    else:
        rows = -(-rows // INT4_ROW_MULTIPLE) * INT4_ROW_MULTIPLE
    # two 4-bit values per byte; a bf16 scale and zero per group of each row
    return rows * cols // 2 + (cols // group) * rows * 2 * QUANTIZED_LLM_DTYPE.itemsize


def quantize_weight(weight: torch.Tensor, mode: str) -> tuple[torch.Tensor, str, str]:
    """Quantise one 2D weight where it lies (its device; its dtype becomes the compute dtype).

    Returns:
        ``(quantised tensor, the kind it got ("int8" / "int4"), a note saying why it got another kind than
        asked, or "")``.
    """
    if weight.ndim != 2 or not weight.is_floating_point():
        raise ValueError(f"only 2D floating weights are quantised, got {tuple(weight.shape)} {weight.dtype}")
    with torch.no_grad():
        if mode == "int8":
            out = _int8(weight), "int8", ""
        elif mode == "int4":
            group = int4_group_size(weight.shape[1])
            if group is None:
                note = f"in_features {weight.shape[1]} is not a multiple of {min(INT4_GROUP_SIZES)}: int8 instead"
                out = _int8(weight), "int8", note
            elif weight.device.type == "cuda":
                out = _int4_cuda(weight, group), "int4", ""
            else:
                out = _int4_cpu(weight, group), "int4", ""
        else:
            raise ValueError(f"unknown quantization mode {mode!r}; use one of {list(QUANTIZATION_MODES)}")
    if weight.device.type == "cpu":
        _release_freed_memory()
    return out


# ---------------------------------------------------------------------------------------------- a whole model
@dataclass
class QuantizationSummary:
    """What a quantised load did: weights per kind, their bytes, and every weight that got another kind.

    Attributes:
        mode: ``"int8"`` or ``"int4"``.
        llm_dtype: the compute dtype of the LLM (:data:`QUANTIZED_LLM_DTYPE`).
        kinds: quantised weights per kind, e.g. ``{"int4": 224, "int8": 97}``.
        quantized_bytes: bytes of the quantised weights.
        fallbacks: ``{key: why}`` for weights that got another kind than ``mode`` asked for (not lm_head's
            :data:`LM_HEAD_MODE`, which is the rule).
    """

    mode: str
    llm_dtype: torch.dtype = QUANTIZED_LLM_DTYPE
    kinds: Counter = field(default_factory=Counter)
    quantized_bytes: int = 0
    fallbacks: dict[str, str] = field(default_factory=dict)

    def add(self, key: str, tensor: torch.Tensor, kind: str, note: str) -> None:
        self.kinds[kind] += 1
        self.quantized_bytes += tensor_bytes(tensor)
        if note:
            self.fallbacks[key] = note

    def describe(self) -> str:
        """One line for logs and the CLI, e.g. ``int4: 8 int4 + 13 int8 weights (0.7 MB); 12 fell back ...``."""
        kinds = " + ".join(f"{n} {k}" for k, n in sorted(self.kinds.items()))
        text = f"{self.mode}: {kinds or 'no'} weights ({self.quantized_bytes / 1e6:.1f} MB)"
        if self.fallbacks:
            reasons = Counter(self.fallbacks.values())
            text += "; " + "; ".join(f"{n} x {why}" for why, n in reasons.items())
        return text


def quantize_model(model: nn.Module, mode: str) -> QuantizationSummary:
    """Quantise the weights of an already-built model in place (:func:`is_quantized_key` names them).

    A weight shared by several modules (the benchmarks' full-size model with shared LLM layers) is quantised
    once and the same quantised parameter given to each module. The caller casts the LLM to the compute dtype
    first (the loader does all of this tensor by tensor instead).
    """
    summary = QuantizationSummary(mode)
    done: dict[int, nn.Parameter] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        key = f"{name}.weight"
        if not isinstance(module, nn.Linear) or not is_quantized_key(key):
            continue
        weight = module.weight
        if id(weight) not in done:
            tensor, kind, note = quantize_weight(weight.detach(), mode_for_key(key, mode))
            done[id(weight)] = nn.Parameter(tensor, requires_grad=False)
            summary.add(key, tensor, kind, note)
        module.weight = done[id(weight)]
    return summary


# ---------------------------------------------------------------------------------------------- int8 decode kernel
def _int8_decode_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight = module.weight
    rows = x.numel() // x.shape[-1]
    if rows > INT8_DECODE_MAX_ROWS or x.device.type != "cpu" or x.dtype != torch.bfloat16:
        return nn.functional.linear(x, weight, module.bias)
    # the same product as torchao's (int8 weight times the bf16-rounded row scale), without casting the whole
    # weight to bf16 first; the kernel needs rows laid out contiguously (a transposed view is not)
    out = torch._weight_int8pack_mm(
        x.reshape(rows, x.shape[-1]).contiguous(), weight.qdata, weight.scale.view(-1).to(x.dtype)
    )
    out = out.reshape(*x.shape[:-1], out.shape[-1])
    return out if module.bias is None else out + module.bias


def use_int8_decode_kernel(model: nn.Module, enabled: bool = True) -> int:
    """Opt-in: int8 linears fed at most :data:`INT8_DECODE_MAX_ROWS` bf16 rows on the CPU (decoding steps, short
    prompts on a cached prefix) use torch's fused int8 kernel ``aten._weight_int8pack_mm`` instead of torchao's
    path, which casts the whole weight to bf16 on every call (6x slower than float32 at one row; the kernel
    runs at ~0.7x). Results differ from torchao's only by float rounding. Returns the linears switched.
    """
    ao = load_torchao()
    if enabled and not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        raise QuantizationUnavailableError(
            f"the int8 decode kernel needs aten._weight_int8pack_mm, which torch {torch.__version__} lacks"
        )
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and isinstance(module.weight, ao.Int8Tensor):
            if enabled:
                module.forward = functools.partial(_int8_decode_forward, module)
            else:
                module.__dict__.pop("forward", None)
            count += 1
    return count
