"""CLIP backbones through open_clip: registry, weight loading, positional-embedding resize.

Re-ID inputs are not CLIP's square 224 px: the pretrained patch-position grid (14 x 14 for
ViT-B/16) is resized bilinearly to the new grid (16 x 8 for 256 x 128 at stride 16; 21 x 10 at
stride 12), keeping the CLS position. We load the checkpoint strictly into the model at its native
size first and resize afterwards (open_clip's ``force_image_size`` cannot load non-square grids).
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from indivaid.registry import Registry

log = logging.getLogger(__name__)


class WeightsError(RuntimeError):
    """Pretrained weights could not be found or do not fit the model."""


@dataclass(frozen=True)
class BackboneSpec:
    """An open_clip model name or a custom open_clip model config (tiny test presets)."""

    open_clip_name: str | None = None
    config: dict[str, Any] | None = None
    default_pretrained: str | None = None


BACKBONES: Registry[BackboneSpec] = Registry("backbone")
BACKBONES.register("ViT-B-16", BackboneSpec("ViT-B-16", default_pretrained="openai"))
BACKBONES.register("ViT-B-32", BackboneSpec("ViT-B-32", default_pretrained="openai"))
# Small random-init ViTs for tests and the CPU demo (no weights to download). ``tiny`` learns the
# synthetic set on two CPU cores in about a minute; ``small`` is wider and deeper.
BACKBONES.register("tiny", BackboneSpec(config={
    "embed_dim": 32,
    "vision_cfg": {"image_size": [64, 32], "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}))
BACKBONES.register("small", BackboneSpec(config={
    "embed_dim": 64,
    "vision_cfg": {"image_size": [128, 64], "layers": 4, "width": 128, "patch_size": 16, "head_width": 64},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}))


def model_config(spec: BackboneSpec) -> dict[str, Any]:
    import open_clip

    if spec.config is not None:
        return copy.deepcopy(spec.config)
    cfg = open_clip.get_model_config(spec.open_clip_name)
    if cfg is None:
        raise WeightsError(f"open_clip has no model config {spec.open_clip_name!r}")
    return copy.deepcopy(cfg)


def _hub_reachable(timeout: float = 0.6) -> bool:
    """Whether huggingface.co answers quickly (DNS included), without hanging offline runs."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.2)
    return bool(ok)


def resolve_weights(model_name: str, pretrained: str, cache_dir: str | None = None) -> tuple[Path, bool]:
    """Path of the checkpoint for an open_clip tag or a local file, and whether it uses QuickGELU."""
    import open_clip

    path = Path(pretrained).expanduser()
    if path.is_file():
        return path, False
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise WeightsError(f"pretrained={pretrained!r} is neither a file nor an open_clip tag of {model_name}; "
                           f"tags: {', '.join(tags) or 'none'}")
    quick = bool(cfg.get("quick_gelu", False))
    hf = cfg.get("hf_hub", "")
    if hf:  # try the local Hugging Face cache first: no network needed when it is there
        try:
            from huggingface_hub import hf_hub_download

            repo_id = "/".join(hf.rstrip("/").split("/")[:2])
            for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
                try:
                    return Path(hf_hub_download(repo_id, name, cache_dir=cache_dir, local_files_only=True)), quick
                except Exception:
                    continue
        except ImportError:
            pass
    if not _hub_reachable():
        raise WeightsError(
            f"the weights for {model_name}/{pretrained} are not cached and the model hub cannot be reached "
            f"(offline, or HF_HUB_OFFLINE=1). Either download them on a connected machine "
            f"(python -c \"import open_clip; open_clip.create_model('{model_name}', pretrained='{pretrained}')\") "
            f"and copy the Hugging Face cache (~/.cache/huggingface) here, or set model.pretrained to a local "
            f"checkpoint file (.pt/.bin/.safetensors)."
        )
    return Path(open_clip.download_pretrained(cfg, cache_dir=cache_dir)), quick


def load_state(path: Path, model: nn.Module) -> dict[str, Tensor]:
    from open_clip.factory import load_state_dict

    try:
        state = load_state_dict(str(path), weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None
    try:
        from open_clip.convert import convert_state_dict

        state = convert_state_dict(model, state)
    except (ImportError, Exception):  # older open_clip or already in open_clip format
        pass
    if any(k.startswith("text.") for k in state) and not any(k.startswith("transformer.") for k in state):
        raise WeightsError(f"{path}: a custom-text-tower checkpoint; this trainer needs the plain CLIP layout")
    return state


def resize_pos_embed(pos: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """``(1 + gh*gw, D)`` positional table resized bilinearly to ``new_grid``; CLS row kept."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    cls, grid = pos[:1], pos[1:]
    d = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], d).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode="bilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], d).to(pos.dtype)
    return torch.cat([cls, grid], 0)


def output_grid(size: tuple[int, int], patch: int, stride: int) -> tuple[int, int]:
    return (size[0] - patch) // stride + 1, (size[1] - patch) // stride + 1


def build_clip(backbone: str, pretrained: str | None, input_size: tuple[int, int], stride: int,
               cache_dir: str | None = None, quick_gelu: bool | None = None) -> nn.Module:
    """An open_clip CLIP model with weights loaded strictly, adapted to ``input_size``/``stride``.

    ``quick_gelu`` None follows the pretrained tag (OpenAI weights use QuickGELU); set it for a
    local checkpoint of OpenAI weights.
    """
    from open_clip.model import CLIP

    spec = BACKBONES.get(backbone)
    cfg = model_config(spec)
    if "timm_model_name" in cfg.get("vision_cfg", {}) or "layers" not in cfg["vision_cfg"] or isinstance(cfg["vision_cfg"]["layers"], (list, tuple)):
        raise WeightsError(f"backbone {backbone!r}: only ViT image towers are supported by this trainer")
    quick = False
    path = None
    if pretrained:
        path, quick = resolve_weights(spec.open_clip_name or backbone, pretrained, cache_dir)
    quick = quick if quick_gelu is None else quick_gelu
    model = CLIP(**cfg, quick_gelu=quick)
    model.uses_quick_gelu = quick  # not in the state dict: inference checkpoints record it
    if path is not None:
        state = load_state(path, model)
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if k != "logit_bias"]
        if missing or result.unexpected_keys:
            raise WeightsError(f"{path} does not fit {backbone}: missing {missing[:5]}, unexpected "
                               f"{result.unexpected_keys[:5]} ({len(missing)} / {len(result.unexpected_keys)} keys)")
        log.info("loaded %s weights from %s", backbone, path)
    adapt_visual(model.visual, input_size, stride)
    return model


def adapt_visual(visual: nn.Module, input_size: tuple[int, int], stride: int) -> None:
    """Resize the positional table and set the patch stride for ``input_size``."""
    patch = visual.conv1.kernel_size[0]
    if stride > patch:
        raise ValueError(f"stride {stride} larger than the patch size {patch} would skip pixels")
    new = output_grid(tuple(input_size), patch, stride)
    old = tuple(visual.grid_size)
    with torch.no_grad():
        visual.positional_embedding = nn.Parameter(resize_pos_embed(visual.positional_embedding.data, old, new))
    visual.conv1.stride = (stride, stride)
    visual.grid_size = new
    visual.image_size = tuple(input_size)
