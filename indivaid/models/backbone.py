"""CLIP backbones through open_clip: registry, weight loading, positional-embedding resize.

Re-ID inputs are not CLIP's square 224 px: the pretrained patch-position grid (14 x 14 for
ViT-B/16) is resized bilinearly to the new grid (16 x 8 for 256 x 128 at stride 16; 21 x 10 at
stride 12), keeping the CLS position. We load the checkpoint strictly into the model at its native
size first and resize afterwards (open_clip's ``force_image_size`` cannot load non-square grids).
The patch stride defaults to the backbone's patch size (16 for ViT-B/16, 14 for ViT-L/14).

Weights (``model.pretrained``): an open_clip tag of the backbone (``openai``), a checkpoint file,
a folder in open_clip's Hugging Face layout (``open_clip_config.json`` + weights; ``local-dir:``
prefix optional), or an open_clip hub tag such as ``hf-hub:imageomics/bioclip`` (BioCLIP,
ViT-B/16) or ``hf-hub:imageomics/bioclip-2`` (ViT-L/14). Hub repos are read from the local
Hugging Face cache first, so they work offline once cached; the architecture shipped with them
must match ``model.backbone``.
"""

from __future__ import annotations

import copy
import json
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
BACKBONES.register("ViT-L-14", BackboneSpec("ViT-L-14", default_pretrained="openai"))  # BioCLIP 2's architecture
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


def patch_size(backbone: str) -> int:
    """The patch size of a registered backbone's image tower (the default stride)."""
    return int(model_config(BACKBONES.get(backbone))["vision_cfg"]["patch_size"])


HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
HUB_CONFIG = "open_clip_config.json"
HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's preference order
#: Architecture keys a shipped model config must share with the backbone's (else the weights do not fit).
ARCH_KEYS = (("embed_dim",), ("vision_cfg", "image_size"), ("vision_cfg", "layers"), ("vision_cfg", "width"),
             ("vision_cfg", "patch_size"), ("text_cfg", "context_length"), ("text_cfg", "vocab_size"),
             ("text_cfg", "width"), ("text_cfg", "layers"))


@dataclass(frozen=True)
class Weights:
    """Where a checkpoint is, whether it was trained with QuickGELU, and the model config shipped
    with it (hub repos and open_clip folders; None for tags and bare files)."""

    path: Path
    quick_gelu: bool
    shipped_config: dict[str, Any] | None = None


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


def resolve_weights(model_name: str, pretrained: str, cache_dir: str | None = None) -> Weights:
    """The checkpoint for ``pretrained``: a file, an open_clip folder, an ``hf-hub:`` repo or an open_clip tag."""
    import open_clip

    if pretrained.startswith(HF_HUB_PREFIX):
        return hub_weights(pretrained[len(HF_HUB_PREFIX):].strip("/"), cache_dir)
    path = Path(pretrained.removeprefix(LOCAL_DIR_PREFIX)).expanduser()
    if path.is_file():
        return Weights(path, False)
    if path.is_dir():
        return folder_weights(path)
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise WeightsError(f"pretrained={pretrained!r} is neither a file, an open_clip folder, an hf-hub: repo nor an "
                           f"open_clip tag of {model_name}; tags: {', '.join(tags) or 'none'}")
    quick = bool(cfg.get("quick_gelu", False))
    hf = cfg.get("hf_hub", "")
    if hf:  # try the local Hugging Face cache first: no network needed when it is there
        repo_id = "/".join(hf.rstrip("/").split("/")[:2])
        for where in _cache_dirs(cache_dir):
            for name in HUB_WEIGHTS:
                found = _cached_hub_file(repo_id, name, where)
                if found is not None:
                    return Weights(found, quick)
    if not _hub_reachable():
        raise WeightsError(
            f"the weights for {model_name}/{pretrained} are not cached and the model hub cannot be reached "
            f"(offline, or HF_HUB_OFFLINE=1). Either download them on a connected machine "
            f"(python -c \"import open_clip; open_clip.create_model('{model_name}', pretrained='{pretrained}')\") "
            f"and copy the Hugging Face cache (~/.cache/huggingface) here, or set model.pretrained to a local "
            f"checkpoint file (.pt/.bin/.safetensors)."
        )
    return Weights(Path(open_clip.download_pretrained(cfg, cache_dir=cache_dir)), quick)


def _cache_dirs(cache_dir: str | None) -> list[str | None]:
    """Hugging Face caches to search: the run's own, then the user's default one (None)."""
    return list(dict.fromkeys([cache_dir, None]))


def _cached_hub_file(repo_id: str, filename: str, cache_dir: str | None) -> Path | None:
    """A file of a hub repo if it is in the local cache ``cache_dir`` (no network), else None."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, cache_dir=cache_dir, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError):
        return None


def _model_cfg(config_file: Path, source: str) -> dict[str, Any]:
    """The ``model_cfg`` of an ``open_clip_config.json``."""
    try:
        model_cfg = json.loads(config_file.read_text()).get("model_cfg")
    except (OSError, ValueError) as e:
        raise WeightsError(f"{source}: cannot read {config_file.name} ({e})") from None
    if not isinstance(model_cfg, dict):
        raise WeightsError(f"{source}: {config_file.name} has no model_cfg; is it an open_clip model?")
    return model_cfg


def _shipped(config_file: Path, weights: Path, source: str) -> Weights:
    """Weights plus the ``model_cfg`` of an ``open_clip_config.json`` (QuickGELU as it says)."""
    model_cfg = _model_cfg(config_file, source)
    return Weights(weights, bool(model_cfg.get("quick_gelu", False)), model_cfg)


def folder_weights(folder: Path) -> Weights:
    """An open_clip model saved in the Hugging Face layout (a downloaded hub snapshot, say)."""
    weights = next((folder / n for n in HUB_WEIGHTS if (folder / n).is_file()), None)
    if weights is None or not (folder / HUB_CONFIG).is_file():
        raise WeightsError(f"{folder}: an open_clip model folder needs {HUB_CONFIG} and one of {', '.join(HUB_WEIGHTS)}")
    return _shipped(folder / HUB_CONFIG, weights, str(folder))


def hub_weights(repo_id: str, cache_dir: str | None = None) -> Weights:
    """An open_clip hub repo (``hf-hub:<repo_id>``): from a local cache if there, else downloaded."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    source = f"{HF_HUB_PREFIX}{repo_id}"
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise WeightsError(f"model.pretrained={source!r}: a hub tag is hf-hub:<owner>/<repo>, e.g. hf-hub:imageomics/bioclip")
    for where in _cache_dirs(cache_dir):
        config = _cached_hub_file(repo_id, HUB_CONFIG, where)
        weights = next((w for w in (_cached_hub_file(repo_id, n, where) for n in HUB_WEIGHTS) if w), None)
        if config is not None and weights is not None:
            return _shipped(config, weights, source)
    if not _hub_reachable():
        raise WeightsError(
            f"model.pretrained={source!r} is not in the local Hugging Face cache and the hub cannot be reached "
            f"(offline, or HF_HUB_OFFLINE=1). On a connected machine run python -c \"import open_clip; "
            f"open_clip.create_model('{source}')\" and copy ~/.cache/huggingface here, or download the repo's "
            f"{HUB_CONFIG} and weights into a folder and set model.pretrained to that folder."
        )
    config = Path(hf_hub_download(repo_id, HUB_CONFIG, cache_dir=cache_dir))
    for name in HUB_WEIGHTS:
        try:
            return _shipped(config, Path(hf_hub_download(repo_id, name, cache_dir=cache_dir)), source)
        except EntryNotFoundError:  # the repo may hold only the other format
            log.info("%s: no %s, trying the next format", source, name)
    raise WeightsError(f"{source}: the repo has none of {', '.join(HUB_WEIGHTS)}")


#: The architecture of well-known hub repos, so a sweep can refuse a mismatched pair before any
#: download (BioCLIP is a ViT-B/16, BioCLIP 2 a ViT-L/14).
KNOWN_HUB_BACKBONES = {"imageomics/bioclip": "ViT-B-16", "imageomics/bioclip-2": "ViT-L-14"}


def weights_mismatch(backbone: str, pretrained: str | None, cache_dir: str | None = None) -> str | None:
    """Offline, without loading anything: why ``pretrained`` cannot fit ``backbone``, or None.

    Checks an open_clip tag against the backbone's tags, and a hub repo against its known or
    locally cached architecture. Files and folders are checked when loaded (they may exist only
    on the nodes that train)."""
    import open_clip

    if pretrained is None:
        return None
    spec = BACKBONES.get(backbone)
    if pretrained.startswith(HF_HUB_PREFIX):
        repo = pretrained[len(HF_HUB_PREFIX):].strip("/")
        known = KNOWN_HUB_BACKBONES.get(repo.lower())
        if known is not None:
            return None if known == backbone else f"{pretrained} is a {known}, not a {backbone}: set model.backbone: {known}"
        config = next((c for c in (_cached_hub_file(repo, HUB_CONFIG, w) for w in _cache_dirs(cache_dir)) if c), None)
        if config is None:
            return None  # checked when it is downloaded
        try:
            check_architecture(backbone, model_config(spec), _model_cfg(config, pretrained), pretrained)
        except WeightsError as e:
            return str(e)
        return None
    if pretrained.startswith(LOCAL_DIR_PREFIX) or "/" in pretrained or "\\" in pretrained or "." in pretrained:
        return None  # a path
    name = spec.open_clip_name
    if name is None:
        return f"backbone {backbone!r} is a random-init test model: it has no weights tags (set model.pretrained: null)"
    if open_clip.get_pretrained_cfg(name, pretrained):
        return None
    tags = open_clip.list_pretrained_tags_by_model(name)
    return f"{pretrained!r} is not an open_clip weights tag of {name} (tags: {', '.join(tags) or 'none'})"


def arch_diffs(ours: dict[str, Any], shipped: dict[str, Any]) -> list[str]:
    """The architecture keys on which a shipped model config differs from ours ("key shipped vs ours")."""
    diffs = []
    for path in ARCH_KEYS:
        a, b = ours, shipped
        for key in path:
            a = a.get(key) if isinstance(a, dict) else None
            b = b.get(key) if isinstance(b, dict) else None
        if a is not None and b is not None and a != b:
            diffs.append(f"{'.'.join(path)} {b} vs {a}")
    return diffs


def check_architecture(backbone: str, ours: dict[str, Any], shipped: dict[str, Any], source: str) -> None:
    """Refuse weights whose shipped model config differs from the backbone's in shape, naming the fix."""
    diffs = arch_diffs(ours, shipped)
    if diffs:
        matching = [n for n in BACKBONES.names() if not arch_diffs(model_config(BACKBONES.get(n)), shipped)]
        hint = f"set model.backbone: {matching[0]}" if matching else "no registered backbone matches it"
        raise WeightsError(f"{source} is a different architecture than backbone {backbone!r} "
                           f"({'; '.join(diffs)}): {hint}")


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
    """Patch-token grid (rows, columns) of an input of ``size`` cut into ``patch`` squares every ``stride``:
    the one place this formula lives (the model, the throughput estimate)."""
    return (size[0] - patch) // stride + 1, (size[1] - patch) // stride + 1


def patch_grid(backbone: str, input_size: tuple[int, int], stride: int | None = None) -> tuple[int, int]:
    """The patch-token grid of a registered backbone at ``input_size`` (``stride`` None: its patch size)."""
    patch = patch_size(backbone)
    return output_grid(tuple(input_size), patch, patch if stride is None else stride)


def build_clip(backbone: str, pretrained: str | None, input_size: tuple[int, int], stride: int | None = None,
               cache_dir: str | None = None, quick_gelu: bool | None = None) -> nn.Module:
    """An open_clip CLIP model with weights loaded strictly, adapted to ``input_size``/``stride``.

    ``stride`` None is the backbone's patch size. ``quick_gelu`` None follows the weights (OpenAI
    tags, or the ``quick_gelu`` of a shipped open_clip config); set it for a local checkpoint of
    OpenAI weights.
    """
    from open_clip.model import CLIP

    spec = BACKBONES.get(backbone)
    cfg = model_config(spec)
    if "timm_model_name" in cfg.get("vision_cfg", {}) or "layers" not in cfg["vision_cfg"] or isinstance(cfg["vision_cfg"]["layers"], (list, tuple)):
        raise WeightsError(f"backbone {backbone!r}: only ViT image towers are supported by this trainer")
    weights = resolve_weights(spec.open_clip_name or backbone, pretrained, cache_dir) if pretrained else None
    if weights is not None and weights.shipped_config is not None:
        check_architecture(backbone, cfg, weights.shipped_config, pretrained)
    quick = quick_gelu if quick_gelu is not None else bool(weights and weights.quick_gelu)
    model = CLIP(**cfg, quick_gelu=quick)
    model.uses_quick_gelu = quick  # not in the state dict: inference checkpoints record it
    if weights is not None:
        path = weights.path
        state = load_state(path, model)
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if k != "logit_bias"]
        if missing or result.unexpected_keys:
            raise WeightsError(f"{path} does not fit {backbone}: missing {missing[:5]}, unexpected "
                               f"{result.unexpected_keys[:5]} ({len(missing)} / {len(result.unexpected_keys)} keys)")
        log.info("loaded %s weights from %s", backbone, path)
    adapt_visual(model.visual, input_size, stride)
    return model


def adapt_visual(visual: nn.Module, input_size: tuple[int, int], stride: int | None = None) -> None:
    """Resize the positional table and set the patch stride (None: the patch size) for ``input_size``."""
    patch = visual.conv1.kernel_size[0]
    stride = patch if stride is None else stride
    if stride > patch:
        raise ValueError(f"stride {stride} larger than the patch size {patch} would skip pixels")
    new = output_grid(tuple(input_size), patch, stride)
    old = tuple(visual.grid_size)
    with torch.no_grad():
        visual.positional_embedding = nn.Parameter(resize_pos_embed(visual.positional_embedding.data, old, new))
    visual.conv1.stride = (stride, stride)
    visual.grid_size = new
    visual.image_size = tuple(input_size)
