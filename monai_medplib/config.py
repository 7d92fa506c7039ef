"""MedPLIB configuration: the release 7b-2e architecture, a tiny test preset, and the release ``config.json``.

The release ``config.json`` has ``model_type: medplib_moe_llama``, which current transformers does not know, so it
is read as plain JSON here and turned into a :class:`MedPLIBConfig`; the LLaMA part becomes a ``LlamaConfig`` and
the CLIP part a ``CLIPVisionConfig`` only inside ``modeling/``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .json_files import read_json

MODEL_TYPE = "medplib_moe_llama"
CONFIG_FILE = "config.json"
CLIP_SUBDIR = "vision_tower"

# openai/clip-vit-large-patch14-336 (the release tower); the checkpoint only stores an absolute path to it.
RELEASE_CLIP: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "num_channels": 3,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "attention_dropout": 0.0,
}
# CLIPVisionConfig kwargs that are kept when reading a CLIP config.json (the rest is bookkeeping).
_CLIP_KEYS = (*RELEASE_CLIP.keys(), "initializer_range", "initializer_factor")

# Fields a release config.json must carry; everything else has a release default.
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "mm_hidden_size",
)


# Keys of the oracle fixture's ``oracle_sam_config`` (upstream ``_build_sam`` argument names) -> our field names.
_UPSTREAM_KEY_ALIASES = {"encoder_adapter": "adapter"}


def _check_ints(owner: str, values: dict[str, Any], minimum: int = 1) -> None:
    """Each value is a whole number (not a bool) >= ``minimum``: a size of ``"128"`` or 0 would otherwise fail deep
    inside torch with an error that names no field."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{owner}{name} must be a whole number >= {minimum}, got {value!r}")


def _check_numbers(owner: str, values: dict[str, Any], positive: bool = True) -> None:
    """Each value is a finite real number, > 0 when ``positive`` (else >= 0)."""
    for name, value in values.items():
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < 0 or (positive and value == 0):
            raise ValueError(
                f"{owner}{name} must be a finite number {'>' if positive else '>='} 0, got {value!r}"
            )


@dataclass
class SamMed2DConfig:
    """Dimensions of SAM-Med2D. Defaults = the ViT-B build the MedPLIB release hard-codes (input 256 px)."""

    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    image_size: int = 256
    patch_size: int = 16
    window_size: int = 14
    mlp_ratio: float = 4.0
    adapter: bool = True
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16

    def __post_init__(self) -> None:
        sizes = ("encoder_embed_dim", "encoder_depth", "encoder_num_heads", "image_size", "patch_size")
        _check_ints("sam_config.", {k: getattr(self, k) for k in (*sizes, "window_size", "prompt_embed_dim")})
        _check_ints("sam_config.", {"mask_in_chans": self.mask_in_chans})
        _check_numbers("sam_config.", {"mlp_ratio": self.mlp_ratio})
        self.encoder_global_attn_indexes = tuple(int(i) for i in self.encoder_global_attn_indexes)
        bad = [i for i in self.encoder_global_attn_indexes if not 0 <= i < self.encoder_depth]
        if bad:
            raise ValueError(
                f"encoder_global_attn_indexes {bad} out of range for encoder_depth={self.encoder_depth}"
            )
        if self.encoder_embed_dim % self.encoder_num_heads:
            raise ValueError(
                f"encoder_embed_dim={self.encoder_embed_dim} not divisible by encoder_num_heads={self.encoder_num_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
            )

    @property
    def embedding_grid(self) -> int:
        """Side of the image-embedding grid (16 for 256 px / patch 16)."""
        return self.image_size // self.patch_size

    @classmethod
    def vit_b(cls) -> SamMed2DConfig:
        """The release build: ViT-B with adapters at 256 px."""
        return cls()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SamMed2DConfig:
        """Build from our own ``to_dict`` output or the upstream ``_build_sam`` keys (``encoder_adapter``)."""
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = _UPSTREAM_KEY_ALIASES.get(key, key)
            if name not in known:
                raise ValueError(
                    f"unknown SAM config key {key!r}; expected one of {sorted(known | set(_UPSTREAM_KEY_ALIASES))}"
                )
            kwargs[name] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuple -> list) that :meth:`from_dict` reads back."""
        out = asdict(self)
        out["encoder_global_attn_indexes"] = list(self.encoder_global_attn_indexes)
        return out


@dataclass
class MedPLIBConfig:
    """All sizes and switches of a MedPLIB model (LLaMA + top-1 MoE, CLIP tower, SAM-Med2D).

    Build it with :meth:`release_7b_2e`, :meth:`tiny` or :meth:`from_pretrained` (a release/saved model directory).
    ``extra`` keeps release ``config.json`` fields that do not change the forward (paths, flags) so that a
    save writes them back.
    """

    # LLaMA
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    # MoE (DeepSpeed semantics, see modeling/moe.py)
    moe_enable: bool = True
    moe_layers_idx: list[int] = field(default_factory=list)
    num_experts: int = 2
    top_k_experts: int = 1
    eval_capacity_factor: float = 2.0
    capacity_factor: float = 1.5
    min_capacity: int = 0
    router_aux_loss_coef: float = 0.0
    # vision
    clip: dict[str, Any] = field(default_factory=lambda: dict(RELEASE_CLIP))
    mm_hidden_size: int = 1024
    mm_projector_type: str = "mlp2x_gelu"
    mm_vision_select_layer: int = -2
    # SAM-Med2D (a SamMed2DConfig; None means the ViT-B release default)
    sam: SamMed2DConfig | None = None
    out_dim: int = 256
    max_sample_point: int = 512
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.sam is None:
            self.sam = SamMed2DConfig()
        elif isinstance(self.sam, dict):
            self.sam = SamMed2DConfig.from_dict(self.sam)
        if self.moe_enable and not self.moe_layers_idx:
            self.moe_layers_idx = list(range(self.num_hidden_layers))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        sizes += ("num_key_value_heads", "max_position_embeddings", "num_experts", "top_k_experts")
        _check_ints(
            "", {k: getattr(self, k) for k in (*sizes, "mm_hidden_size", "out_dim", "max_sample_point")}
        )
        _check_ints("", {k: getattr(self, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}, 0)
        _check_ints("", {"min_capacity": self.min_capacity}, 0)
        _check_numbers("", {"rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta})
        factors = ("eval_capacity_factor", "capacity_factor", "router_aux_loss_coef")
        _check_numbers("", {k: getattr(self, k) for k in factors}, positive=False)
        if not isinstance(self.clip, dict):
            raise ValueError(f"clip_config must be a JSON object, got {self.clip!r}")
        clip_sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        _check_ints("clip_config.", {k: self.clip.get(k) for k in (*clip_sizes, "image_size", "patch_size")})
        if self.clip["image_size"] % self.clip["patch_size"]:
            raise ValueError(
                f"clip_config.image_size {self.clip['image_size']} is not a multiple of its patch_size "
                f"{self.clip['patch_size']}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.moe_enable and self.top_k_experts != 1:
            raise ValueError(
                f"only top-1 MoE is implemented (the release); got top_k_experts={self.top_k_experts}"
            )
        bad = [i for i in self.moe_layers_idx if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"moe_layers_idx {bad} outside 0..{self.num_hidden_layers - 1}")
        if self.mm_projector_type != "mlp2x_gelu":
            raise ValueError(
                f"mm_projector_type {self.mm_projector_type!r} is not supported (release: mlp2x_gelu)"
            )
        if self.clip.get("hidden_size") != self.mm_hidden_size:
            raise ValueError(
                f"mm_hidden_size {self.mm_hidden_size} differs from the CLIP hidden_size {self.clip.get('hidden_size')}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_image_tokens(self) -> int:
        return (self.clip["image_size"] // self.clip["patch_size"]) ** 2

    # ---------------------------------------------------------------- presets
    @classmethod
    def release_7b_2e(cls) -> MedPLIBConfig:
        """`Huangxs/MedPLIB-7b-2e`: LLaMA-7B, all 32 MLPs as 2-expert top-1 MoE, CLIP-L/336, SAM-Med2D ViT-B."""
        return cls(
            vocab_size=32267,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
        )

    @classmethod
    def tiny(cls) -> MedPLIBConfig:
        """Random-weight test size with the release structure (vocabulary of the public fixture tokenizer)."""
        clip = dict(
            RELEASE_CLIP, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2
        )
        sam = {
            "encoder_embed_dim": 64,
            "encoder_depth": 2,
            "encoder_num_heads": 2,
            "encoder_global_attn_indexes": (1,),
        }
        return cls(
            vocab_size=867,
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            clip=clip,
            mm_hidden_size=32,
            sam=sam,
        )

    # ---------------------------------------------------------------- release config.json
    @classmethod
    def from_dict(cls, data: dict[str, Any], clip: dict[str, Any] | None = None) -> MedPLIBConfig:
        """Build from the content of a release ``config.json`` (``clip`` overrides the CLIP config)."""
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise ValueError(f"MedPLIB config.json lacks required fields: {', '.join(missing)}")
        moe = data.get("moe") or {}
        if not isinstance(moe, dict):
            raise ValueError(f"config.json 'moe' must be a JSON object or null, got {moe!r}")
        experts = moe.get("num_experts", 2)
        if isinstance(experts, list):
            if len(set(experts)) > 1:
                raise ValueError(f"moe.num_experts differs between layers: {experts}")
            experts = experts[0] if experts else 2
        clip_cfg = clip or data.get("clip_config") or dict(RELEASE_CLIP)
        sam_cfg = data.get("sam_config") or data.get("oracle_sam_config")
        handled = set(_REQUIRED) | {
            "num_key_value_heads",
            "max_position_embeddings",
            "rms_norm_eps",
            "rope_theta",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
            "moe",
            "mm_projector_type",
            "mm_vision_select_layer",
            "out_dim",
            "max_sample_point",
            "clip_config",
            "sam_config",
        }
        return cls(
            vocab_size=data["vocab_size"],
            hidden_size=data["hidden_size"],
            intermediate_size=data["intermediate_size"],
            num_hidden_layers=data["num_hidden_layers"],
            num_attention_heads=data["num_attention_heads"],
            num_key_value_heads=data.get("num_key_value_heads") or data["num_attention_heads"],
            max_position_embeddings=data.get("max_position_embeddings", 2048),
            rms_norm_eps=data.get("rms_norm_eps", 1e-5),
            # transformers 4.31 configs have no rope_theta: RoPE base 10000
            rope_theta=data.get("rope_theta") or 10000.0,
            bos_token_id=data.get("bos_token_id", 1),
            eos_token_id=data.get("eos_token_id", 2),
            pad_token_id=data.get("pad_token_id", 0),
            moe_enable=moe.get("moe_enable", bool(moe)),
            moe_layers_idx=list(moe.get("moe_layers_idx", [])),
            num_experts=experts,
            top_k_experts=moe.get("top_k_experts", 1),
            eval_capacity_factor=moe.get("eval_capacity_factor", 2.0),
            capacity_factor=moe.get("capacity_factor", 1.5),
            min_capacity=moe.get("min_capacity", 0),
            router_aux_loss_coef=moe.get("router_aux_loss_coef", 0.0),
            clip={k: v for k, v in clip_cfg.items() if k in _CLIP_KEYS},
            mm_hidden_size=data["mm_hidden_size"],
            mm_projector_type=data.get("mm_projector_type", "mlp2x_gelu"),
            mm_vision_select_layer=data.get("mm_vision_select_layer", -2),
            sam=sam_cfg,
            out_dim=data.get("out_dim", 256),
            max_sample_point=data.get("max_sample_point", 512),
            extra={k: v for k, v in data.items() if k not in handled},
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> MedPLIBConfig:
        """Read ``path/config.json`` (+ ``path/vision_tower/config.json`` for CLIP when present)."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"MedPLIB model directory not found: {path}")
        cfg_file = path / CONFIG_FILE
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path} is not a MedPLIB checkpoint: no {CONFIG_FILE} in it")
        data = read_json(cfg_file, dict)
        model_type = data.get("model_type")
        if model_type != MODEL_TYPE and "moe" not in data:
            raise ValueError(
                f"{cfg_file} is not a MedPLIB checkpoint config: model_type {model_type!r} "
                f"(expected {MODEL_TYPE!r}) and no 'moe' section"
            )
        clip = None
        clip_file = path / CLIP_SUBDIR / CONFIG_FILE
        if clip_file.is_file():
            clip = read_json(clip_file, dict)
        return cls.from_dict(data, clip=clip)

    def to_release_dict(self) -> dict[str, Any]:
        """``config.json`` content in the release layout, plus ``clip_config``/``sam_config`` (self-describing)."""
        all_layers = list(range(self.num_hidden_layers))
        sam = self.sam.to_dict()
        out: dict[str, Any] = {
            "architectures": ["MedPLIBForCausalLM"],
            "model_type": MODEL_TYPE,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "use_cache": False,
            "mm_vision_select_feature": "patch",
            "mm_use_im_start_end": True,
            "mm_use_im_patch_token": False,
            "tune_mm_mlp_adapter": False,
            "image_aspect_ratio": "square",
            "image_grid_pinpoints": None,
            "region_fea_adapter": True,
            "region_geo_sampler": False,
        }
        out.update(self.extra)
        out.update(
            {
                "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_hidden_layers,
                "num_attention_heads": self.num_attention_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "max_position_embeddings": self.max_position_embeddings,
                "rms_norm_eps": self.rms_norm_eps,
                "rope_theta": self.rope_theta,
                "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id,
                "mm_hidden_size": self.mm_hidden_size,
                "mm_projector_type": self.mm_projector_type,
                "mm_vision_select_layer": self.mm_vision_select_layer,
                "out_dim": self.out_dim,
                "max_sample_point": self.max_sample_point,
                "moe": {
                    "moe_enable": self.moe_enable,
                    "moe_mode": "dense" if self.moe_layers_idx == all_layers else "custom",
                    "moe_layers_idx": list(self.moe_layers_idx),
                    "num_experts": [self.num_experts] * len(self.moe_layers_idx),
                    "top_k_experts": self.top_k_experts,
                    "capacity_factor": self.capacity_factor,
                    "eval_capacity_factor": self.eval_capacity_factor,
                    "min_capacity": self.min_capacity,
                    "ep_size": 1,
                    "use_residual": False,
                    "router_aux_loss_coef": self.router_aux_loss_coef,
                },
                "clip_config": dict(self.clip),
                "sam_config": sam,
            }
        )
        return out
