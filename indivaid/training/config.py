"""The trainer's configuration: one frozen dataclass per section, loaded by :mod:`indivaid.config`.

``preset: NAME`` starts from ``indivaid/presets/NAME.yaml`` (the public per-dataset settings of
docs/method.md section 6, adjusted for batched stage 1) and the file's own keys override it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

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
    # Train on the training and the validation identities (the paper's protocol for closed-set final
    # runs, whose config and epoch count a search already fixed); validation is then not scored.
    train_on_val: bool = field(default=False, metadata={"omit_default": True})

    def __post_init__(self) -> None:
        if self.train_on_val and self.split.unknown_fraction > 0:
            raise ValueError("train_on_val: an open-set split (split.unknown_fraction > 0) calibrates its decision "
                             "threshold on validation identities, which must stay out of training; turn one of them off")


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "ViT-B-16"
    # open_clip tag, hf-hub:<owner>/<repo> (e.g. hf-hub:imageomics/bioclip), checkpoint file or
    # open_clip folder, or null for random init
    pretrained: str | None = "openai"
    quick_gelu: bool | None = None  # None: follow the weights (the tag, or a shipped open_clip config)
    input_size: tuple[int, int] = (256, 128)
    stride: int | None = field(default=None, metadata={"ge": 1})  # None: the backbone's patch size
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
    # The fusion module's own (absolute) stage-2 learning rate, warm-up and milestones included:
    # it starts at the mean and must move away from it (docs/method.md section 4, the study).
    lr: float = field(default=1e-3, metadata={"gt": 0})

    #: Keys that were renamed: the loader names the new key instead of only "unknown key".
    renamed: ClassVar[dict[str, str]] = {
        "lr_factor": "lr, an absolute learning rate, no longer a factor of stage2.lr"}


@dataclass(frozen=True)
class Stage1Config:
    epochs: int = field(default=120, metadata={"ge": 0})
    min_steps: int = field(default=1000, metadata={"ge": 0})  # the budget is max(epochs, min_steps)
    batch_p: int = field(default=16, metadata={"ge": 1})
    batch_k: int = field(default=4, metadata={"ge": 1})
    lr: float = field(default=3.5e-4, metadata={"gt": 0})
    weight_decay: float = 1e-4
    warmup_epochs: int = field(default=5, metadata={"ge": 0})
    warmup_lr_init: float = field(default=1e-5, metadata={"ge": 0})  # the warm-up starts here (timm's name)
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
    # open-set runs: None calibrates the threshold that maximises sqrt(BAKS * BAUS) on validation; a
    # value picks the largest threshold whose new-individual recall (BAUS) reaches it
    target_new_recall: float | None = field(default=None, metadata={"ge": 0.0, "le": 1.0, "omit_default": True})


@dataclass(frozen=True)
class CheckpointConfig:
    """Resumable training state. A finished run needs none of it (``model.pt`` and ``result.json``
    hold what evaluation, reproduction and the leaderboard use), so it is deleted at the end unless
    ``keep``; ``every: 0`` writes none at all, for runs too short to be worth resuming."""

    every: int = field(default=1, metadata={"ge": 0})  # epochs between saves; 0: no mid-run checkpoint
    keep: bool = False  # keep the last training checkpoint after the run finishes


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    seed: int = 0
    deterministic: bool = False
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    threads: int | None = None
    # Caps every epoch's optimiser steps (rehearsals on CPU); epoch counts, stage 1's step budget in
    # epochs, schedules and evaluation cadence stay as configured.
    max_steps_per_epoch: int | None = field(default=None, metadata={"ge": 1})
    # torch.compile the stage-2 image tower and head. None: on for CUDA, off elsewhere (on CPU the
    # one-off compile costs more than a short run gains). A failed compile falls back to eager.
    compile: bool | None = field(default=None, metadata={"omit_default": True})
    compile_backend: str = field(default="inductor", metadata={"omit_default": True})  # e.g. aot_eager to debug


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
        from indivaid.models.backbone import BACKBONES, model_config, patch_size
        from indivaid.models.fusion import FUSIONS

        if self.method not in METHODS:
            raise ValueError(f"method: unknown {self.method!r}{did_you_mean(self.method, METHODS.names())}; "
                             f"methods: {', '.join(METHODS.names())}")
        if self.model.backbone not in BACKBONES:
            raise ValueError(f"model.backbone: unknown {self.model.backbone!r}"
                             f"{did_you_mean(self.model.backbone, BACKBONES.names())}")
        # frozen: set the resolved stride the way dataclasses' own __init__ does
        object.__setattr__(self, "model", with_stride(self.model, patch_size(self.model.backbone)))
        method = METHODS.get(self.method)
        if method.train:
            embed_dim = int(model_config(BACKBONES.get(self.model.backbone))["embed_dim"])
            FUSIONS.get(method.fusion).check(self.fusion, embed_dim)
            check_milestones(self.stage2)


def with_stride(model: ModelConfig, patch: int) -> ModelConfig:
    """``model`` with its patch stride resolved (None: the backbone's ``patch``) and checked."""
    if model.stride is None:
        model = replace(model, stride=patch)
    if model.stride > patch:
        raise ValueError(f"model.stride: {model.stride} is larger than the {model.backbone} patch size {patch}, so "
                         f"pixels between patches would never be seen; use at most {patch} (unset: {patch})")
    if min(model.input_size) < patch:
        raise ValueError(f"model.input_size: {list(model.input_size)} is smaller than the {model.backbone} patch "
                         f"size {patch}")
    return model


def check_milestones(s2: Stage2Config) -> None:
    """Stage-2 milestones must come after the warm-up: one at or before its end would lower the
    rate before it ever reaches ``stage2.lr`` (the 1-based reference schedule, docs/method.md §9)."""
    from indivaid.training.schedule import milestone_epochs

    if list(s2.milestones) != sorted(s2.milestones):
        raise ValueError(f"stage2.milestones: {list(s2.milestones)} must be in increasing order")
    if s2.epochs == 0:
        return
    epochs = milestone_epochs(s2.milestones, s2.milestone_unit, s2.epochs)
    early = [m for m, e in zip(s2.milestones, epochs) if e <= s2.warmup_epochs]
    if early:
        resolved = f" (fractions of stage2.epochs={s2.epochs}: epochs {epochs})" if s2.milestone_unit == "fraction" else ""
        raise ValueError(
            f"stage2.milestones: {early} come at or before the end of the {s2.warmup_epochs}-epoch warm-up{resolved}, "
            f"so the learning rate would drop before it ever reached stage2.lr; put every milestone after epoch "
            f"{s2.warmup_epochs}, or shorten stage2.warmup_epochs (0: no warm-up)")


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
