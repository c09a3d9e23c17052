"""Robustness of a checkpoint to field conditions: corrupted queries against a clean gallery.

Camera traps photograph at night, in rain and fog, through foliage, with cheap optics and heavy
JPEG compression; the catalogue (gallery) is usually the good photos. So each corruption is
applied to the split's *query* images only, at three severities, and the split is scored again:
mAP and Rank-1 per corruption x severity, and relative robustness = corrupted / clean. Its mean
over every corruption and severity is one number per model (``mean_rel_mAP``), comparable across
methods on the same split: it answers whether text guidance (IndivAID) makes the image encoder
more robust than CLIP-ReID.

Corruptions are batched tensor ops on the run's device, on images in ``[0, 1]``, quantised back
to 8 bits (a corrupted photo is still a photo): kornia where it has the operation (gamma,
brightness, motion blur, filtering with a defocus disk, differentiable JPEG, antialiased
resizing), a few lines of torch where it does not (colour cast, haze, noise, occlusion). Sizes
(blur kernels, patches) scale with the image, so a severity means the same at 48 x 96 and at
256 x 128. Blur starts where it changes a ViT's view of the animal: blur much smaller than a
16-px patch is averaged away by the patch embedding (defocus radii of 3 and 6 % of the short side,
the range of ImageNet-C's, left the tiny test model's mAP unchanged); severity 3 is a badly smeared night shot (a
motion trail half the short side long, a defocus disk 40 % of it across).

Every random draw comes from a generator seeded by (seed, corruption, severity): a rerun with the
same seed and batch size gives the same scores.

``robustness_scores(checkpoint, ...)`` returns a JSON-ready dict; ``summary_metrics`` flattens it
for a results table (the sweep harness records these per final model).
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

SEVERITIES = (1, 2, 3)
Apply = Callable[[Tensor, Any, torch.Generator], Tensor]


@dataclass(frozen=True)
class Corruption:
    """A field condition at three severities: ``levels[s - 1]`` parametrises severity ``s``."""

    name: str
    description: str
    levels: tuple[Any, Any, Any]
    apply: Apply


def _odd(value: float, minimum: int = 3) -> int:
    """The odd integer nearest to ``value`` (kernel sizes), at least ``minimum``."""
    return max(minimum, 2 * round((value - 1) / 2) + 1)


def _uniform(n: int, low: float, high: float, x: Tensor, gen: torch.Generator) -> Tensor:
    return torch.rand(n, device=x.device, generator=gen, dtype=x.dtype) * (high - low) + low


def darkness(x: Tensor, level: tuple[float, float], gen: torch.Generator) -> Tensor:
    """Under-exposure (dusk, night without flash): ``gain * x ** gamma``."""
    gamma, gain = level
    return kornia.enhance.adjust_gamma(x, gamma, gain)


def brightness(x: Tensor, level: float, gen: torch.Generator) -> Tensor:
    """Over-exposure (flash at close range, sun glare): a constant added, highlights saturate."""
    return kornia.enhance.adjust_brightness(x, level)


def colour_cast(x: Tensor, level: float, gen: torch.Generator) -> Tensor:
    """A white-balance error (sodium light, green foliage, IR-cut filters): per-image channel gains
    ``1 + level * u`` along a random direction ``u`` with zero mean (brightness roughly kept)."""
    u = torch.randn(x.shape[0], 3, device=x.device, generator=gen, dtype=x.dtype)
    u = u - u.mean(1, keepdim=True)
    u = u / u.norm(dim=1, keepdim=True).clamp(min=1e-6)
    return x * (1 + level * u).clamp(min=0).view(-1, 3, 1, 1)


def haze(x: Tensor, level: float, gen: torch.Generator) -> Tensor:
    """Fog or mist: the scattering model ``x * t + airlight * (1 - t)``, with a patchy transmission
    ``t`` around ``1 - level`` (smooth random field, kornia's Gaussian blur of coarse noise)."""
    b, _, h, w = x.shape
    coarse = torch.rand(b, 1, max(2, h // 8), max(2, w // 8), device=x.device, generator=gen, dtype=x.dtype)
    field = kornia.filters.gaussian_blur2d(F.interpolate(coarse, (h, w), mode="bilinear", align_corners=False),
                                           _odd(min(h, w) / 4), (min(h, w) / 12,) * 2)
    t = (1 - level + 0.15 * (field - 0.5)).clamp(0.02, 1)
    return x * t + 0.85 * (1 - t)


def motion_blur(x: Tensor, level: float, gen: torch.Generator) -> Tensor:
    """A moving animal or camera: a line kernel ``level`` x the short side long, random angle per image."""
    angle = _uniform(x.shape[0], 0.0, 180.0, x, gen)
    k = _odd(level * min(x.shape[-2:]))
    return kornia.filters.motion_blur(x, k, angle, torch.zeros_like(angle), border_type="reflect")


def defocus_kernel(radius: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A normalised disk of ``radius`` pixels with an antialiased rim (the shape of defocus)."""
    r = math.ceil(radius)
    ax = torch.arange(-r, r + 1, device=device, dtype=dtype)
    dist = (ax.view(-1, 1) ** 2 + ax.view(1, -1) ** 2).sqrt()
    disk = (radius + 0.5 - dist).clamp(0, 1)
    return (disk / disk.sum()).unsqueeze(0)


def defocus_blur(x: Tensor, level: float, gen: torch.Generator) -> Tensor:
    """Out of focus (the animal nearer or farther than the focus): a disk of ``level`` x the short side."""
    radius = max(0.75, level * min(x.shape[-2:]))
    return kornia.filters.filter2d(x, defocus_kernel(radius, x.device, x.dtype), border_type="reflect")


def gaussian_noise(x: Tensor, level: float, gen: torch.Generator) -> Tensor:
    """Sensor noise at high ISO (night): additive N(0, level) per pixel and channel."""
    return x + level * torch.randn(x.shape, device=x.device, generator=gen, dtype=x.dtype)


def jpeg(x: Tensor, level: float, gen: torch.Generator) -> Tensor:
    """Heavy compression (trail cameras, messaging apps): JPEG at quality ``level`` (kornia's codec)."""
    quality = torch.full((x.shape[0],), float(level), device=x.device, dtype=x.dtype)
    return kornia.enhance.jpeg_codec_differentiable(x, quality)


def low_resolution(x: Tensor, level: int, gen: torch.Generator) -> Tensor:
    """A distant animal: downsampled by ``level`` (antialiased) and scaled back up bilinearly."""
    h, w = x.shape[-2:]
    small = kornia.geometry.transform.resize(x, (max(1, h // level), max(1, w // level)), antialias=True)
    return kornia.geometry.transform.resize(small, (h, w), interpolation="bilinear")


def occlusion(x: Tensor, level: float, gen: torch.Generator, patches: int = 3) -> Tensor:
    """Foliage or fences in front of the animal: ``patches`` rectangles of random aspect, random
    place and a random flat colour per image, together about ``level`` of the image's area."""
    b, _, h, w = x.shape
    area = level / patches * h * w
    aspect = torch.exp(_uniform(b * patches, math.log(0.5), math.log(2.0), x, gen)).view(b, patches)
    ph = (area * aspect).sqrt().clamp(1, h).round()
    pw = (area / aspect).sqrt().clamp(1, w).round()
    top = (torch.rand(b, patches, device=x.device, generator=gen, dtype=x.dtype) * (h - ph + 1)).floor()
    left = (torch.rand(b, patches, device=x.device, generator=gen, dtype=x.dtype) * (w - pw + 1)).floor()
    colour = torch.rand(b, 3, 1, 1, device=x.device, generator=gen, dtype=x.dtype)
    ys = torch.arange(h, device=x.device, dtype=x.dtype).view(1, 1, h, 1)
    xs = torch.arange(w, device=x.device, dtype=x.dtype).view(1, 1, 1, w)
    inside = ((ys >= top[..., None, None]) & (ys < (top + ph)[..., None, None])
              & (xs >= left[..., None, None]) & (xs < (left + pw)[..., None, None])).any(1, keepdim=True)
    return torch.where(inside, colour, x)


#: The suite, in report order; three severities each, mild to severe.
CORRUPTIONS: tuple[Corruption, ...] = (
    Corruption("darkness", "under-exposure: gain x pixel^gamma", ((1.5, 0.6), (2.0, 0.35), (2.5, 0.15)), darkness),
    Corruption("brightness", "over-exposure: + constant, clipped", (0.25, 0.45, 0.65), brightness),
    Corruption("colour_cast", "white-balance error: channel gains 1 + s·u", (0.25, 0.5, 0.8), colour_cast),
    Corruption("haze", "fog: x·t + airlight·(1 - t), t ≈ 1 - s", (0.35, 0.55, 0.75), haze),
    Corruption("motion_blur", "line kernel, s x short side, random angle", (0.15, 0.3, 0.5), motion_blur),
    Corruption("defocus_blur", "disk kernel, radius s x short side", (0.06, 0.12, 0.2), defocus_blur),
    Corruption("gaussian_noise", "additive N(0, s) on [0, 1] pixels", (0.05, 0.1, 0.2), gaussian_noise),
    Corruption("jpeg", "JPEG quality s", (30, 15, 5), jpeg),
    Corruption("low_resolution", "downsampled by s, scaled back", (2, 4, 8), low_resolution),
    Corruption("occlusion", "3 flat patches covering s of the area", (0.1, 0.2, 0.35), occlusion),
)
NAMES = tuple(c.name for c in CORRUPTIONS)


def get_corruption(name: str) -> Corruption:
    """The corruption called ``name``; an unknown name lists the valid ones."""
    for c in CORRUPTIONS:
        if c.name == name:
            return c
    import difflib

    close = difflib.get_close_matches(name, NAMES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown corruption {name!r}{hint}; valid: {', '.join(NAMES)}")


def generator_for(seed: int, name: str, severity: int, device: torch.device) -> torch.Generator:
    """An independent random stream per (seed, corruption, severity): cells do not depend on order."""
    g = torch.Generator(device=device)
    g.manual_seed(zlib.crc32(f"{seed}/{name}/{severity}".encode()))
    return g


def corrupt(images: Tensor, corruption: Corruption, severity: int, gen: torch.Generator) -> Tensor:
    """uint8 ``B x 3 x H x W`` -> the corrupted uint8 batch (computed in fp32 on the batch's device)."""
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity}")
    x = images.to(torch.float32) / 255.0
    y = corruption.apply(x, corruption.levels[severity - 1], gen)
    return (y.clamp(0, 1) * 255.0).round().to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# scoring


def _features(model, images: Callable[[int, int], Tensor], n: int, batch: int,
              transform: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Features of ``n`` cached images, ``batch`` at a time, each batch optionally transformed first."""
    out = []
    for s in range(0, n, batch):
        x = images(s, min(n, s + batch)).to(model.device)
        out.append(model.embed_uint8(transform(x) if transform else x).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 1)


def _scores(metrics: dict[str, float], clean: dict[str, float] | None = None) -> dict[str, float]:
    """mAP and Rank-1 (and, against ``clean``, their ratios: the relative robustness)."""
    out = {"mAP": float(metrics["mAP"]), "rank1": float(metrics["rank1"])}
    if clean is not None:
        out["rel_mAP"] = out["mAP"] / clean["mAP"] if clean["mAP"] > 0 else math.nan
        out["rel_rank1"] = out["rank1"] / clean["rank1"] if clean["rank1"] > 0 else math.nan
    return out


def robustness_scores(checkpoint: str | Path, *, dataset: str | None = None, path: str | None = None,
                      split_file: str | None = None, split: str = "test", device: str | None = None,
                      seed: int = 0, corruptions: Sequence[str] | None = None,
                      batch_size: int | None = None) -> dict[str, Any]:
    """Score ``checkpoint`` on ``split`` clean, then with its queries corrupted (gallery clean).

    The split is ``split_file``, else ``dataset`` (``path``) split as the run's config says, else
    the run's ``split.csv`` beside the checkpoint. ``device`` defaults to the run's own. Returns
    a JSON-ready dict: ``clean``, ``corruptions`` (name -> one entry per severity), ``summary`` and
    ``metrics`` (:func:`summary_metrics`: flat ``robust_*`` numbers)."""
    from indivaid.data.imagecache import build_image_cache
    from indivaid.eval.retrieval import score_retrieval
    from indivaid.inference import checkpoint_split, load_inference, pick_device
    from indivaid.training.trainer import cache_root

    chosen = [get_corruption(n) for n in (corruptions or NAMES)]
    probe = load_inference(checkpoint, "cpu")
    dev = pick_device(device, probe.cfg)
    model = probe if dev.type == "cpu" else load_inference(checkpoint, dev)
    sp = checkpoint_split(model, checkpoint, dataset=dataset, path=path, split_file=split_file)
    cache = build_image_cache(sp, model.spec, cache_root(model.cfg))
    q, g = sp.query_gallery(split)
    if q.height == 0 or g.height == 0:
        raise ValueError(f"split {split!r} of {sp.dataset} has {q.height} queries and {g.height} gallery images")
    q_rows, g_rows = cache.rows(q["image_id"].to_list()), cache.rows(g["image_id"].to_list())
    batch = batch_size or model.cfg.eval.batch_size
    gf = _features(model, lambda s, e: cache[g_rows[s:e]], len(g_rows), batch)

    def score(qf: Tensor) -> dict[str, float]:
        m = score_retrieval(qf, gf, q, g, protocol=sp.protocol, camera_codes=sp.camera_codes(), metric=model.metric)
        return m.as_dict()

    def queries(s: int, e: int) -> Tensor:
        return cache[q_rows[s:e]]

    clean = _scores(score(_features(model, queries, len(q_rows), batch)))
    cells: dict[str, list[dict[str, Any]]] = {}
    for c in chosen:
        cells[c.name] = []
        for sev in SEVERITIES:
            gen = generator_for(seed, c.name, sev, dev)
            qf = _features(model, queries, len(q_rows), batch,
                           lambda x, c=c, sev=sev, gen=gen: corrupt(x, c, sev, gen))
            cell = {"severity": sev, "level": c.levels[sev - 1], **_scores(score(qf), clean)}
            cells[c.name].append(cell)
            log.info("%s severity %d: mAP %.1f%% (%.0f%% of clean)", c.name, sev, 100 * cell["mAP"],
                     100 * cell["rel_mAP"])
    result = {"checkpoint": str(Path(checkpoint).resolve()), "method": model.cfg.method, "dataset": sp.dataset,
              "split": split, "split_hash": sp.hash, "protocol": sp.protocol, "seed": seed, "device": str(dev),
              "queries": q.height, "gallery": g.height, "clean": clean, "corruptions": cells,
              "descriptions": {c.name: c.description for c in chosen}, "summary": summarize(cells)}
    result["metrics"] = summary_metrics(result)  # flat, for readers that must not import torch (results tables)
    return result


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def summarize(cells: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Mean relative robustness over every corruption and severity, and per corruption."""
    every = [cell for cs in cells.values() for cell in cs]
    return {"mean_rel_mAP": _mean([c["rel_mAP"] for c in every]),
            "mean_rel_rank1": _mean([c["rel_rank1"] for c in every]),
            "per_corruption_rel_mAP": {n: _mean([c["rel_mAP"] for c in cs]) for n, cs in cells.items()}}


def summary_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Flat ``robust_*`` figures of a :func:`robustness_scores` result, for one results-table row:
    the means, and each corruption's mean relative mAP."""
    s = result["summary"]
    out = {"robust_rel_mAP": s["mean_rel_mAP"], "robust_rel_rank1": s["mean_rel_rank1"],
           "robust_clean_mAP": result["clean"]["mAP"]}
    out.update({f"robust_{n}_rel_mAP": v for n, v in s["per_corruption_rel_mAP"].items()})
    return out


# ---------------------------------------------------------------------------------------------
# report: JSON and a plot


def write_report(result: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """``robustness.json`` and ``robustness.png`` (mAP and Rank-1 against severity) in ``out_dir``."""
    import json

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    js = folder / "robustness.json"
    js.write_text(json.dumps(result, indent=2) + "\n")
    png = folder / "robustness.png"
    plot(result, png)
    return js, png


def plot(result: dict[str, Any], out: Path) -> None:
    """One line per corruption from the clean score (severity 0) to severity 3, mAP and Rank-1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    cmap = plt.get_cmap("tab10")
    for ax, key, label in ((axes[0], "mAP", "mAP"), (axes[1], "rank1", "Rank-1")):
        clean = 100 * result["clean"][key]
        for i, (name, cells) in enumerate(result["corruptions"].items()):
            ys = [clean] + [100 * c[key] for c in cells]
            ax.plot(range(len(ys)), ys, marker="o", ms=3, color=cmap(i % 10), label=name)
        ax.axhline(clean, color="black", lw=0.8, ls="--")
        ax.set_xticks(range(len(SEVERITIES) + 1), ["clean", *map(str, SEVERITIES)])
        ax.set_xlabel("severity (queries corrupted, gallery clean)")
        ax.set_ylabel(f"{label} (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{result['method']} on {result['dataset']} ({result['split']}): mean relative mAP "
                 f"{100 * result['summary']['mean_rel_mAP']:.0f}%", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
