"""The trainer's configuration: one frozen dataclass per section, loaded by :mod:`indivaid.config`.

``preset: NAME`` starts from ``indivaid/presets/NAME.yaml`` (the public per-dataset settings of
method.md section 6, adjusted for batched stage 1) and the file's own keys override it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from indivaid.config import ConfigError, apply_overrides, from_dict, read_mapping
from indivaid.data.augment import AugmentConfig
from indivaid.data.split import SplitConfig
from indivaid.registry import did_you_mean


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "synthetic"
    path: str | None = None  # the dataset folder; default: under data_root
    data_root: str | None = None  # default: $INDIVAID_DATA or ./data
    options: dict[str, Any] = field(default_factory=dict)  # adapter options (e.g. synthetic generator params)
    split: SplitConfig = SplitConfig()
    split_file: str | None = None  # use this split file instead of building one
    skip_bad: bool = False
    resize: Literal["stretch", "letterbox"] = "stretch"
    cache_dir: str | None = None  # image + feature caches; default <data_root>/cache, shared between runs
    workers: int = field(default=8, metadata={"ge": 1})


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "ViT-B-16"
    pretrained: str | None = "openai"  # open_clip tag, checkpoint file, or null for random init
    quick_gelu: bool | None = None  # None: follow the pretrained tag
    input_size: tuple[int, int] = (256, 128)
    stride: int = field(default=16, metadata={"ge": 1})
    sie: bool = False  # camera embedding on the CLS token
    sie_coef: float = 1.0
    similarity: Literal["dot", "cosine"] = "dot"  # dot: CLIP-ReID's raw logits (tau = 1)
    logit_scale: float = field(default=1.0, metadata={"gt": 0})  # multiplies cosine logits
    learn_logit_scale: bool = False


@dataclass(frozen=True)
class PromptConfig:
    n_ctx: int = field(default=4, metadata={"ge": 1, "le": 16})
    template: str = "A photo of a {ctx} {species}."
    init_std: float = 0.02


@dataclass(frozen=True)
class FusionConfig:
    heads: int = field(default=8, metadata={"ge": 1})
    lr_factor: float = field(default=0.1, metadata={"gt": 0})  # fusion lr = stage2.lr * lr_factor


@dataclass(frozen=True)
class Stage1Config:
    epochs: int = field(default=120, metadata={"ge": 0})
    min_steps: int = field(default=1000, metadata={"ge": 0})  # the budget is max(epochs, min_steps)
    batch_p: int = field(default=16, metadata={"ge": 1})
    batch_k: int = field(default=4, metadata={"ge": 1})
    lr: float = field(default=3.5e-4, metadata={"gt": 0})
    weight_decay: float = 1e-4
    warmup_epochs: int = field(default=5, metadata={"ge": 0})
    lr_min: float = 1e-6


@dataclass(frozen=True)
class Stage2Config:
    epochs: int = field(default=60, metadata={"ge": 0})
    batch_p: int = field(default=16, metadata={"ge": 1})
    batch_k: int = field(default=4, metadata={"ge": 1})
    lr: float = field(default=5e-6, metadata={"gt": 0})
    weight_decay: float = 1e-4
    bias_lr_factor: float = 2.0
    warmup_epochs: int = field(default=10, metadata={"ge": 0})
    warmup_factor: float = 0.1
    milestones: tuple[float, ...] = (0.5, 0.8333)  # fractions of the run (30/60, 50/60) or epochs, see unit
    milestone_unit: Literal["fraction", "epoch"] = "fraction"
    gamma: float = 0.1
    id_weight: float = 0.25
    triplet_weight: float = 1.0
    i2t_weight: float = 1.0
    margin: float = 0.3
    label_smoothing: float = 0.1


@dataclass(frozen=True)
class EvalConfig:
    every: int = field(default=1, metadata={"ge": 1})  # validate every k stage-2 epochs
    after_bn: bool = False
    part_norm: bool = False
    metric: Literal["euclidean", "cosine"] = "euclidean"
    batch_size: int = field(default=256, metadata={"ge": 1})


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = field(default=1, metadata={"ge": 1})  # epochs


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    seed: int = 0
    deterministic: bool = False
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    threads: int | None = None


@dataclass(frozen=True)
class TrainConfig:
    method: str = "indivaid"
    preset: str | None = None
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    prompt: PromptConfig = PromptConfig()
    fusion: FusionConfig = FusionConfig()
    stage1: Stage1Config = Stage1Config()
    stage2: Stage2Config = Stage2Config()
    augment: AugmentConfig = AugmentConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    def __post_init__(self) -> None:
        from indivaid.methods import METHODS
        from indivaid.models.backbone import BACKBONES

        if self.method not in METHODS:
            raise ValueError(f"method: unknown {self.method!r}{did_you_mean(self.method, METHODS.names())}; "
                             f"methods: {', '.join(METHODS.names())}")
        if self.model.backbone not in BACKBONES:
            raise ValueError(f"model.backbone: unknown {self.model.backbone!r}"
                             f"{did_you_mean(self.model.backbone, BACKBONES.names())}")
        if METHODS.get(self.method).fusion == "attention":
            from indivaid.models.backbone import model_config

            dim = model_config(BACKBONES.get(self.model.backbone))["embed_dim"]
            if dim % self.fusion.heads:
                raise ValueError(f"fusion.heads: {self.fusion.heads} does not divide the {self.model.backbone} "
                                 f"text-feature width {dim}")


def preset_names() -> list[str]:
    return sorted(p.stem for p in resources.files("indivaid.presets").iterdir() if p.name.endswith(".yaml"))


def merge(base: dict, over: dict) -> dict:
    """Deep merge: ``over``'s keys win, nested mappings merge."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve(data: dict[str, Any], source: str = "config") -> TrainConfig:
    """A TrainConfig from a mapping, with its ``preset`` (if any) underneath."""
    preset = data.get("preset")
    if preset is not None:
        names = preset_names()
        if preset not in names:
            raise ConfigError(f"{source}: preset: unknown {preset!r}{did_you_mean(str(preset), names)}; presets: {', '.join(names)}")
        base = yaml.safe_load(resources.files("indivaid.presets").joinpath(f"{preset}.yaml").read_text()) or {}
        data = merge(base, data)
    try:
        return from_dict(TrainConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(file: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    data = read_mapping(file) if file is not None else {}
    return resolve(apply_overrides(data, list(overrides)), str(file or "--set"))
