"""Procedural synthetic animal re-identification dataset.

Tests and demos need a dataset that is small, offline, deterministic and *learnable but not
trivial*: a tiny CLIP model trained on CPU should visibly improve on it, while raw-pixel
nearest neighbours should do poorly. Each identity is an animal with a persistent coat (stripes,
spots or patches in two or three colours, defined in the animal's own body frame so it moves with
the pose) and a persistent body shape (a weaker cue). Each image varies pose, scale, crop,
lighting, background clutter, blur, noise and occlusion; each camera adds its own tint, gamma and
background style; images of one identity come in encounters (visits) whose conditions are
correlated. A fraction of identities are lookalikes: near-copies of another identity's coat.

Everything is a pure function of (:class:`SynthParams`, :data:`GENERATOR_VERSION`): every image
has its own random stream derived from (seed, identity, image index), so the output does not
depend on worker order. Output folders are written to a temporary name and renamed under a file
lock, so concurrent callers never see half a dataset.

Run ``python -m indivaid.data.synth --out ROOT`` to write the default dataset and print its path.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import hashlib
import io
import json
import logging
import math
import multiprocessing as mp
import os
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indivaid.utils.io import file_lock
from PIL import Image, ImageFilter

log = logging.getLogger(__name__)

#: Bump whenever the rendering or the layout changes: it is part of the dataset folder's hash, so
#: a new version never silently reuses images made by an old one.
GENERATOR_VERSION = "1"

#: Columns of ``metadata.csv`` (wildlife-datasets convention plus camera/encounter/date).
METADATA_COLUMNS = ("image_id", "identity", "path", "camera", "encounter", "date", "species")

_MIN_IMAGES_FOR_POOL = 300  # below this, rendering inline beats starting worker processes

# Independent random streams, one per purpose, so adding draws to one never shifts another.
_S_GENOME, _S_LAYOUT, _S_ENCOUNTER, _S_IMAGE, _S_CAMERA, _S_LOOKALIKE, _S_PERTURB, _S_STYLE = range(8)


@dataclass(frozen=True)
class SynthParams:
    """Everything that determines the dataset; its JSON (plus the version) names the folder."""

    identities: int = 160
    min_images: int = 6
    max_images: int = 14
    max_encounters: int = 4
    cameras: int = 3
    height: int = 96
    width: int = 160
    lookalike_fraction: float = 0.15
    occlusion_prob: float = 0.25  # about the fraction of images with vegetation in front
    jpeg_quality: int = 90
    species: str = "animal"
    start_date: str = "2021-01-01"
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "identities >= 1": self.identities >= 1,
            "1 <= min_images <= max_images": 1 <= self.min_images <= self.max_images,
            "max_encounters >= 2": self.max_encounters >= 2,
            "cameras >= 1": self.cameras >= 1,
            "height >= 16 and width >= 16": self.height >= 16 and self.width >= 16,
            "0 <= lookalike_fraction <= 0.5": 0.0 <= self.lookalike_fraction <= 0.5,
            "0 <= occlusion_prob <= 1": 0.0 <= self.occlusion_prob <= 1.0,
            "1 <= jpeg_quality <= 100": 1 <= self.jpeg_quality <= 100,
            "seed >= 0": self.seed >= 0,
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid SynthParams ({', '.join(failed)}): {self}")
        dt.date.fromisoformat(self.start_date)  # fails early on a bad date


def dataset_dir_name(params: SynthParams) -> str:
    """``Synthetic-<12 hex>``: a hash of the params and the generator version."""
    text = json.dumps(
        {"params": dataclasses.asdict(params), "generator_version": GENERATOR_VERSION},
        sort_keys=True,
        separators=(",", ":"),
    )
    return f"Synthetic-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def identity_name(index: int) -> str:
    return f"id{index:04d}"


def _rng(seed: int, *key: int) -> np.random.Generator:
    """A random stream addressed by ``key``: independent of the order things are generated in."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


# --------------------------------------------------------------------------------------------
# Per-identity genome: coat, colours, body shape.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Field:
    """A smooth random scalar field: a sum of cosines, evaluated analytically at any point."""

    kx: np.ndarray
    ky: np.ndarray
    phase: np.ndarray
    amp: np.ndarray

    def __call__(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        arg = x[..., None] * self.kx + y[..., None] * self.ky + self.phase
        return (np.cos(arg) * self.amp).sum(axis=-1)

    def grid(self, xs: np.ndarray, ys: np.ndarray, affine: Sequence[float] = (1, 0, 0, 0, 1, 0)) -> np.ndarray:
        """The field on the pixel grid ys x xs (1-D axes) seen through an affine map.

        ``affine`` = (ax, bx, x0, ay, by, y0) maps pixel (X, Y) to field point
        (ax X + bx Y + x0, ay X + by Y + y0). Each cosine's argument is then a sum of a term in X
        and a term in Y, so cos(a + b) = cos a cos b - sin a sin b makes the whole grid two small
        matmuls instead of a cosine per pixel and component.
        """
        ax, bx, x0, ay, by, y0 = affine
        a = xs[:, None] * (self.kx * ax + self.ky * ay)
        b = ys[:, None] * (self.kx * bx + self.ky * by) + (self.kx * x0 + self.ky * y0 + self.phase)
        return (np.cos(b) * self.amp) @ np.cos(a).T - (np.sin(b) * self.amp) @ np.sin(a).T


def _random_field(rng: np.random.Generator, n: int, fmin: float, fmax: float) -> _Field:
    """Roughly unit-variance field with spatial frequencies in [fmin, fmax] cycles per unit."""
    theta = rng.uniform(0, 2 * np.pi, n)
    freq = rng.uniform(fmin, fmax, n)
    amp = rng.uniform(0.5, 1.0, n)
    amp = amp / np.sqrt((amp**2).sum() / 2)
    return _Field(
        kx=(2 * np.pi * freq * np.cos(theta)).astype(np.float32),
        ky=(2 * np.pi * freq * np.sin(theta)).astype(np.float32),
        phase=rng.uniform(0, 2 * np.pi, n).astype(np.float32),
        amp=amp.astype(np.float32),
    )


def _perturb_field(f: _Field, rng: np.random.Generator, redraw: float, fmin: float, fmax: float) -> _Field:
    """Same field with a fraction of its components redrawn: a lookalike's coat."""
    n = len(f.kx)
    new = _random_field(rng, n, fmin, fmax)
    pick = rng.random(n) < redraw
    pick[rng.integers(n)] = True  # always change at least one component
    mix = lambda a, b: np.where(pick, b, a).astype(np.float32)  # noqa: E731
    phase = f.phase + rng.normal(0, 0.25, n).astype(np.float32)
    amp = mix(f.amp, new.amp)
    amp = amp / np.sqrt((amp**2).sum() / 2)
    return _Field(mix(f.kx, new.kx), mix(f.ky, new.ky), mix(phase, new.phase), amp.astype(np.float32))


# Coat base colours (RGB, 0..1): natural animal tones plus a few unnatural ones for variety.
_COAT_BASES = np.array(
    [
        [0.93, 0.91, 0.86],  # off-white
        [0.85, 0.74, 0.52],  # tan
        [0.80, 0.55, 0.25],  # orange / tiger
        [0.60, 0.40, 0.22],  # brown
        [0.35, 0.24, 0.16],  # dark brown
        [0.55, 0.55, 0.55],  # grey
        [0.15, 0.14, 0.13],  # near black
        [0.90, 0.80, 0.35],  # golden
        [0.70, 0.35, 0.25],  # rust
        [0.55, 0.60, 0.70],  # blue-grey
        [0.75, 0.65, 0.60],  # fawn
    ],
    dtype=np.float32,
)

_PATTERN_TYPES = ("stripes", "spots", "patches")
_PATTERN_FREQ = {"stripes": (0.5, 1.1), "spots": (1.6, 2.6), "patches": (0.7, 1.3)}


@dataclass(frozen=True)
class _Genome:
    """What makes an identity itself: coat pattern, colours and body proportions."""

    pattern: str
    field: _Field
    stripe_freq: float  # cycles per body unit
    stripe_angle: float
    stripe_phase: float
    warp: float
    threshold: float
    field3: _Field | None  # third-colour regions, if any
    threshold3: float
    base: np.ndarray
    mark: np.ndarray
    third: np.ndarray
    body_a: float
    body_b: float
    neck_len: float
    neck_angle: float
    head_len: float
    head_h: float
    leg_len: float
    leg_w: float
    tail_len: float
    ear: float


def _jitter_colour(rng: np.random.Generator, c: np.ndarray, s: float) -> np.ndarray:
    return np.clip(c + rng.normal(0, s, 3), 0.02, 0.98).astype(np.float32)


def _make_genome(rng: np.random.Generator) -> _Genome:
    """A fresh identity. Coat parameters vary most, so the coat carries the identity."""
    pattern = _PATTERN_TYPES[rng.integers(len(_PATTERN_TYPES))]
    fmin, fmax = _PATTERN_FREQ[pattern]
    base = _jitter_colour(rng, _COAT_BASES[rng.integers(len(_COAT_BASES))], 0.06)
    # The mark colour contrasts with the base in lightness, with its own hue.
    lum = float(base.mean())
    mark_choice = _COAT_BASES[rng.integers(len(_COAT_BASES))]
    if abs(float(mark_choice.mean()) - lum) < 0.3:
        mark_choice = np.full(3, 0.1 if lum > 0.45 else 0.92, np.float32) * 0.6 + mark_choice * 0.4
    mark = _jitter_colour(rng, mark_choice, 0.05)
    third = _jitter_colour(rng, _COAT_BASES[rng.integers(len(_COAT_BASES))], 0.08)
    has_third = rng.random() < 0.4
    # Spots threshold the field high (sparse marks); stripes and patches near its middle.
    threshold = float(rng.uniform(0.5, 1.0) if pattern == "spots" else rng.uniform(-0.4, 0.4))
    return _Genome(
        pattern=pattern,
        field=_random_field(rng, 12, fmin, fmax),
        stripe_freq=float(rng.uniform(1.2, 2.6)),
        stripe_angle=float(rng.uniform(-0.6, 0.6) + (np.pi / 2 if rng.random() < 0.75 else 0.0)),
        stripe_phase=float(rng.uniform(0, 2 * np.pi)),
        warp=float(rng.uniform(0.8, 2.2)),
        threshold=threshold,
        field3=_random_field(rng, 6, 0.4, 1.0) if has_third else None,
        threshold3=float(rng.uniform(0.3, 0.9)),
        base=base,
        mark=mark,
        third=third,
        body_a=float(rng.uniform(0.9, 1.12)),
        body_b=float(rng.uniform(0.36, 0.52)),
        neck_len=float(rng.uniform(0.3, 0.7)),
        neck_angle=float(rng.uniform(0.3, 1.1)),
        head_len=float(rng.uniform(0.3, 0.45)),
        head_h=float(rng.uniform(0.14, 0.22)),
        leg_len=float(rng.uniform(0.45, 0.8)),
        leg_w=float(rng.uniform(0.06, 0.11)),
        tail_len=float(rng.uniform(0.3, 0.8)),
        ear=float(rng.uniform(0.06, 0.14)),
    )


def _lookalike(parent: _Genome, rng: np.random.Generator) -> _Genome:
    """A near-copy of ``parent``: same kind of coat and colours, locally different pattern."""
    fmin, fmax = _PATTERN_FREQ[parent.pattern]

    def scale(v: float, s: float = 0.05) -> float:
        return float(v * rng.uniform(1 - s, 1 + s))

    return dataclasses.replace(
        parent,
        field=_perturb_field(parent.field, rng, 0.35, fmin, fmax),
        stripe_phase=parent.stripe_phase + float(rng.choice([-1, 1]) * rng.uniform(0.6, 1.4)),
        threshold=parent.threshold + float(rng.normal(0, 0.08)),
        base=_jitter_colour(rng, parent.base, 0.03),
        mark=_jitter_colour(rng, parent.mark, 0.03),
        body_a=scale(parent.body_a),
        body_b=scale(parent.body_b),
        leg_len=scale(parent.leg_len),
        tail_len=scale(parent.tail_len, 0.2),
    )


def _genomes(params: SynthParams) -> tuple[list[_Genome], dict[int, int]]:
    """All identities' genomes and the lookalike -> parent map."""
    n = params.identities
    n_look = min(int(round(params.lookalike_fraction * n)), n // 2)
    order = _rng(params.seed, _S_LOOKALIKE).permutation(n)
    lookalikes = sorted(int(i) for i in order[:n_look])
    originals = sorted(int(i) for i in order[n_look:])
    genomes = [_make_genome(_rng(params.seed, _S_GENOME, i)) for i in range(n)]
    parents: dict[int, int] = {}
    for i in lookalikes:
        r = _rng(params.seed, _S_PERTURB, i)
        parents[i] = originals[int(r.integers(len(originals)))]
        genomes[i] = _lookalike(genomes[parents[i]], r)
    return genomes, parents


# --------------------------------------------------------------------------------------------
# Cameras, encounters and the image plan.
# --------------------------------------------------------------------------------------------

# Background styles: (ground, vegetation/far, clutter colours...), RGB 0..1.
_BG_STYLES = (
    ((0.45, 0.55, 0.25), (0.30, 0.45, 0.20), (0.60, 0.62, 0.30), (0.25, 0.35, 0.15), (0.50, 0.45, 0.30)),
    ((0.72, 0.62, 0.42), (0.55, 0.58, 0.35), (0.80, 0.72, 0.50), (0.45, 0.38, 0.25), (0.62, 0.50, 0.32)),
    ((0.28, 0.24, 0.18), (0.15, 0.28, 0.15), (0.35, 0.30, 0.20), (0.10, 0.18, 0.10), (0.40, 0.45, 0.25)),
    ((0.62, 0.62, 0.60), (0.70, 0.75, 0.80), (0.45, 0.45, 0.45), (0.80, 0.80, 0.78), (0.35, 0.38, 0.40)),
)


_FOLIAGE = np.array([0.22, 0.38, 0.14], np.float32)


@dataclass(frozen=True)
class _Camera:
    """A camera's persistent look: tint, gamma, background style, sharpness and sensor noise."""

    tint: np.ndarray
    gamma: float
    style: np.ndarray  # (k, 3) background palette
    blur: float
    noise: float


def _cameras(params: SynthParams) -> list[_Camera]:
    """Each camera's look; the first four get distinct background styles."""
    style_order = _rng(params.seed, _S_STYLE).permutation(len(_BG_STYLES))
    cams = []
    for c in range(params.cameras):
        r = _rng(params.seed, _S_CAMERA, c)
        style = np.array(_BG_STYLES[style_order[c % len(_BG_STYLES)]], np.float32)
        style = np.clip(style + r.normal(0, 0.05, style.shape), 0.02, 0.98).astype(np.float32)
        cams.append(
            _Camera(
                tint=np.clip(1 + r.normal(0, 0.05, 3), 0.88, 1.12).astype(np.float32),
                gamma=float(r.uniform(0.85, 1.2)),
                style=style,
                blur=float(r.uniform(0.0, 0.4)),
                noise=float(r.uniform(1.0, 4.0)),
            )
        )
    return cams


@dataclass(frozen=True)
class _Encounter:
    """One visit: a camera, a date and the conditions its frames share."""

    name: str
    camera: int
    date: str
    facing: int  # +1 faces right, -1 faces left
    scale: float  # fraction of the width the animal spans
    cx: float
    cy: float
    rotation: float
    yaw: float
    brightness: float
    contrast: float
    tint: np.ndarray
    light_angle: float
    light_strength: float
    horizon: float
    bg_seed: int
    occluded: bool


@dataclass(frozen=True)
class _ImageSpec:
    identity: int
    index: int
    encounter: _Encounter

    @property
    def image_id(self) -> str:
        return f"{identity_name(self.identity)}_{self.index:03d}"

    @property
    def rel_path(self) -> str:
        return f"images/{identity_name(self.identity)}/{self.image_id}.jpg"


def _plan_identity(params: SynthParams, i: int) -> list[_ImageSpec]:
    """How many images identity ``i`` has, in which encounters, on which cameras and dates."""
    r = _rng(params.seed, _S_LAYOUT, i)
    n_img = int(r.integers(params.min_images, params.max_images + 1))
    n_enc = 1 if n_img < 2 else min(n_img, int(r.integers(2, params.max_encounters + 1)))
    sizes = np.ones(n_enc, int) + r.multinomial(n_img - n_enc, r.dirichlet(np.full(n_enc, 2.0)))
    # The first two encounters are on different cameras, so market1501 keeps some positives.
    if params.cameras >= 2 and n_enc >= 2:
        cams = list(r.choice(params.cameras, 2, replace=False)) + list(r.integers(0, params.cameras, n_enc - 2))
        cams = [int(c) for c in r.permutation(cams)]
    else:
        cams = [int(c) for c in r.integers(0, params.cameras, n_enc)]
    start = dt.date.fromisoformat(params.start_date)
    days = np.sort(r.choice(3 * 365, n_enc, replace=False))
    specs: list[_ImageSpec] = []
    for k in range(n_enc):
        e = _rng(params.seed, _S_ENCOUNTER, i, k)
        enc = _Encounter(
            name=f"{identity_name(i)}_e{k}",
            camera=cams[k],
            date=(start + dt.timedelta(days=int(days[k]))).isoformat(),
            facing=1 if e.random() < 0.5 else -1,
            scale=float(e.uniform(0.6, 0.95)),
            cx=float(e.uniform(0.4, 0.6)),
            cy=float(e.uniform(0.45, 0.55)),
            rotation=float(e.uniform(-0.25, 0.25)),
            yaw=float(e.uniform(0.7, 1.0)),
            brightness=float(e.uniform(0.8, 1.2)),
            contrast=float(e.uniform(0.8, 1.15)),
            tint=np.clip(1 + e.normal(0, 0.03, 3), 0.9, 1.1).astype(np.float32),
            light_angle=float(e.uniform(0, 2 * np.pi)),
            light_strength=float(e.uniform(0.0, 0.3)),
            horizon=float(e.uniform(0.15, 0.6)),
            bg_seed=int(e.integers(2**31)),
            occluded=bool(e.random() < params.occlusion_prob * 1.4),
        )
        specs.extend(_ImageSpec(i, 0, enc) for _ in range(int(sizes[k])))
    return [dataclasses.replace(s, index=j) for j, s in enumerate(specs)]


def _plan(params: SynthParams) -> list[_ImageSpec]:
    return [s for i in range(params.identities) for s in _plan_identity(params, i)]


# --------------------------------------------------------------------------------------------
# Rendering: vectorised numpy over coordinate grids.
# --------------------------------------------------------------------------------------------


def _smoothstep(d: np.ndarray) -> np.ndarray:
    """Soft 0..1 edge from a signed distance in pixels (positive inside): cheap antialiasing."""
    return np.clip(d + 0.5, 0.0, 1.0)


def _capsule(
    x: np.ndarray, y: np.ndarray, p0: Sequence[float], p1: Sequence[float], r0: float, r1: float
) -> np.ndarray:
    """Signed distance (positive inside) to a tapered segment from p0 (radius r0) to p1 (r1)."""
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    ll = dx * dx + dy * dy + 1e-9
    t = np.clip(((x - p0[0]) * dx + (y - p0[1]) * dy) / ll, 0.0, 1.0)
    px, py = x - (p0[0] + t * dx), y - (p0[1] + t * dy)
    return (r0 + (r1 - r0) * t) - np.sqrt(px * px + py * py)


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, angle: float = 0.0) -> np.ndarray:
    """Approximate signed distance (positive inside) to a rotated ellipse."""
    c, s = math.cos(angle), math.sin(angle)
    u = (x - cx) * c + (y - cy) * s
    v = -(x - cx) * s + (y - cy) * c
    return (1.0 - np.sqrt((u / a) ** 2 + (v / b) ** 2)) * min(a, b)


def _paint(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray | float) -> None:
    """Alpha-composite ``colour`` (RGB, or an (H, W, 3) array) over ``img`` in place."""
    img += alpha[..., None] * (colour - img)


class _Axes(dict):
    """Cached float32 ``arange(n)``: coordinate axes that broadcast into grids."""

    def __missing__(self, n: int) -> np.ndarray:
        self[n] = np.arange(n, dtype=np.float32)
        return self[n]


_AXES = _Axes()


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Broadcastable pixel coordinates: xx of shape (1, w), yy of shape (h, 1)."""
    return _AXES[w][None, :], _AXES[h][:, None]


def _local(h: int, w: int, cx: float, cy: float, rad: float) -> tuple[slice, slice, np.ndarray, np.ndarray] | None:
    """Pixel window around (cx, cy): clutter items only touch their own bounding box."""
    y0, y1 = max(0, int(cy - rad) - 1), min(h, int(cy + rad) + 2)
    x0, x1 = max(0, int(cx - rad) - 1), min(w, int(cx + rad) + 2)
    if y0 >= y1 or x0 >= x1:
        return None
    return slice(y0, y1), slice(x0, x1), _AXES[x1][None, x0:], _AXES[y1][y0:, None]


def _background(h: int, w: int, cam: _Camera, enc: _Encounter, rng: np.random.Generator) -> np.ndarray:
    """Ground, far vegetation and clutter: shared layout within an encounter, panned per image."""
    er = np.random.default_rng(enc.bg_seed)
    pal = cam.style
    xx, yy = _grid(h, w)
    pan = rng.normal(0, 0.1 * w)
    xs = (xx + pan) / w
    ys = yy / h
    field = _random_field(er, 8, 1.0, 4.0)
    low = field.grid(xs[0] * 1.6, ys[:, 0])  # large-scale colour variation
    horizon = enc.horizon + 0.05 * np.sin(xs * er.uniform(2, 8) + er.uniform(0, 6)) + rng.normal(0, 0.02)
    far = _jitter_colour(er, pal[1], 0.04)
    ground = _jitter_colour(er, pal[0], 0.04)
    t = np.clip((ys - horizon) * h / 3.0, 0.0, 1.0)[..., None]
    img = (far * (1 - t) + ground * t) * (1.0 + 0.12 * low[..., None]).astype(np.float32)
    img += rng.standard_normal((h, w, 1), dtype=np.float32) * 0.03  # fine texture
    # Encounter clutter (bushes, rocks, trunks) plus per-image clutter (grass, pebbles).
    clutter = (
        (er, int(er.integers(3, 9)), int(er.integers(0, 5))),
        (rng, int(rng.integers(1, 6)), int(rng.integers(2, 11))),
    )
    for source, n_blobs, n_lines in clutter:
        for _ in range(n_blobs):
            cx = source.uniform(-0.1, 1.1) * w + (pan if source is er else 0.0)
            cy = source.uniform(0, 1) * h
            a, b = source.uniform(0.02, 0.18) * w, source.uniform(0.02, 0.12) * h
            win = _local(h, w, cx, cy, max(a, b))
            if win is None:
                continue
            sy, sx, lx, ly = win
            d = _ellipse(lx, ly, cx, cy, a, b, source.uniform(-0.5, 0.5))
            col = _jitter_colour(source, pal[source.integers(len(pal))], 0.04)
            _paint(img[sy, sx], _smoothstep(d) * source.uniform(0.3, 0.8), col)
        for _ in range(n_lines):
            x0, y0 = source.uniform(0, w), source.uniform(0.2, 1.05) * h
            length = source.uniform(0.05, 0.3) * h
            ang = -np.pi / 2 + source.normal(0, 0.35)
            x1, y1 = x0 + length * math.cos(ang), y0 + length * math.sin(ang)
            win = _local(h, w, (x0 + x1) / 2, (y0 + y1) / 2, length / 2 + 2)
            if win is None:
                continue
            sy, sx, lx, ly = win
            d = _capsule(lx, ly, (x0, y0), (x1, y1), source.uniform(0.4, 1.5), 0.3)
            col = _jitter_colour(source, pal[source.integers(len(pal))], 0.08)
            _paint(img[sy, sx], _smoothstep(d), col)
    return img


def _coat(g: _Genome, x: np.ndarray, y: np.ndarray, grid: tuple[np.ndarray, np.ndarray, tuple]) -> np.ndarray:
    """Coat colour at body-frame points (x, y) of the pixel grid: the identity's main signal.

    ``grid`` = (pixel x axis, pixel y axis, pixel -> body-frame affine) lets the fields use
    :meth:`_Field.grid`.
    """
    f = g.field.grid(*grid)
    if g.pattern == "stripes":
        u = x * math.cos(g.stripe_angle) + y * math.sin(g.stripe_angle)
        s = np.sin(2 * np.pi * g.stripe_freq * u + g.stripe_phase + g.warp * f)
        m = np.clip((s - g.threshold) * 3.0 + 0.5, 0.0, 1.0)
    else:
        m = np.clip((f - g.threshold) * 3.0 + 0.5, 0.0, 1.0)
    col = g.base * (1 - m[..., None]) + g.mark * m[..., None]
    if g.field3 is not None:
        m3 = np.clip((g.field3.grid(*grid) - g.threshold3) * 3.0 + 0.5, 0.0, 1.0) * (1 - m)
        col = col * (1 - m3[..., None]) + g.third * m3[..., None]
    return col


def _animal(
    img: np.ndarray, g: _Genome, enc: _Encounter, rng: np.random.Generator
) -> tuple[float, float, float, float]:
    """Draw the animal in place; returns its rough pixel bounding box (x0, y0, x1, y1)."""
    h, w = img.shape[:2]
    facing = enc.facing * (-1 if rng.random() < 0.15 else 1)  # sometimes it turns around
    span = np.clip(enc.scale * rng.uniform(0.88, 1.12), 0.45, 1.0)
    s = span * w / (2 * g.body_a + 1.4)  # pixels per body unit
    rot = enc.rotation + rng.normal(0, 0.08)
    yaw = float(np.clip(enc.yaw + rng.normal(0, 0.05), 0.6, 1.0))
    cx = (enc.cx + rng.normal(0, 0.06)) * w
    cy = (enc.cy + rng.normal(0, 0.05)) * h
    a, b = g.body_a, g.body_b
    foot = b + g.leg_len
    # Pose of the parts (body frame: x forward, y down, body centre at the origin).
    swing = rng.normal(0, 0.25, 4)
    nx0, ny0 = a * 0.7, -b * 0.35
    hx, hy = nx0 + g.neck_len * math.cos(g.neck_angle), ny0 - g.neck_len * math.sin(g.neck_angle)
    head_dir = rng.normal(0.5, 0.15)  # muzzle angle below horizontal
    mx, my = hx + g.head_len * math.cos(head_dir), hy + g.head_len * math.sin(head_dir)
    ex, ey = hx - g.head_h * 0.3, hy - g.head_h * 0.9
    tang = rng.uniform(1.1, 1.6)
    t0 = (-a * 0.95, -b * 0.3)
    t1 = (t0[0] - g.tail_len * math.cos(tang) * 0.6, t0[1] + g.tail_len * math.sin(tang))
    legs = []
    for k, lx in enumerate((a * 0.62, a * 0.42, -a * 0.5, -a * 0.7)):
        top = (lx, b * 0.4)
        legs.append((top, (lx + g.leg_len * math.sin(swing[k]), top[1] + g.leg_len * math.cos(swing[k]) + b * 0.6)))

    # Only pixels near each part are computed: the body-frame box of a part is mapped to pixels.
    c, sn = math.cos(rot), math.sin(rot)
    shift = 0.25 * a  # centre the whole animal, not just the body, in the frame

    def pixel_box(x0: float, y0: float, x1: float, y1: float) -> tuple[int, int, int, int]:
        corners = np.array([[x0, y0], [x0, y1], [x1, y0], [x1, y1]]) - [shift, 0]
        u = corners[:, 0] * facing * yaw
        pxs = cx + s * (c * u - sn * corners[:, 1])
        pys = cy + s * (sn * u + c * corners[:, 1])
        return (
            max(0, int(math.floor(pxs.min())) - 1),
            max(0, int(math.floor(pys.min())) - 1),
            min(w, int(pxs.max()) + 2),
            min(h, int(pys.max()) + 2),
        )

    wx0, wy0, wx1, wy1 = pixel_box(
        min(-a * 1.4, t1[0] - 0.1),
        min(-b, hy - g.head_h - 2 * g.ear, ey - 2 * g.ear) - 0.1,
        max(a * 1.4, mx + g.head_h, hx + g.head_h) + 0.1,
        foot + 0.25,
    )
    if wx0 >= wx1 or wy0 >= wy1:
        return cx, cy, cx + 1, cy + 1
    view = img[wy0:wy1, wx0:wx1]
    xx, yy = _AXES[wx1][None, wx0:], _AXES[wy1][wy0:, None]
    # Pixel (X, Y) -> body frame (ax X + bx Y + x0, ay X + by Y + y0): rotate, un-squeeze, flip.
    k = 1.0 / (s * facing * yaw)
    affine = (c * k, sn * k, shift - (c * cx + sn * cy) * k, -sn / s, c / s, (sn * cx - c * cy) / s)
    x = affine[0] * xx + affine[1] * yy + affine[2]
    y = affine[3] * xx + affine[4] * yy + affine[5]
    edge = 1.0 / s  # one pixel in body units

    def union(dist: np.ndarray, p0: tuple[float, float], p1: tuple[float, float], r0: float, r1: float) -> None:
        """dist = max(dist, capsule), evaluated only on the capsule's own pixel box."""
        r = max(r0, r1)
        (lo_x, hi_x), (lo_y, hi_y) = sorted((p0[0], p1[0])), sorted((p0[1], p1[1]))
        bx0, by0, bx1, by1 = pixel_box(lo_x - r, lo_y - r, hi_x + r, hi_y + r)
        sl = (slice(max(by0 - wy0, 0), max(by1 - wy0, 0)), slice(max(bx0 - wx0, 0), max(bx1 - wx0, 0)))
        local = dist[sl]
        if local.size:
            np.maximum(local, _capsule(x[sl], y[sl], p0, p1, r0, r1), out=local)

    # Ground shadow under the feet.
    shadow = _smoothstep(_ellipse(x, y, 0.1, foot + 0.02, a * 1.3, 0.12) / edge) * 0.45
    view *= 1 - shadow[..., None] * 0.6

    dist = _ellipse(x, y, 0, 0, a, b)
    union(dist, (nx0, ny0), (hx, hy), b * 0.55, g.head_h * 0.9)
    union(dist, (hx, hy), (mx, my), g.head_h, g.head_h * 0.6)
    union(dist, (hx, hy), (ex - g.ear * 0.5, ey - g.ear), g.ear * 0.7, g.ear * 0.2)
    for top, bot in legs:
        union(dist, top, bot, g.leg_w * 1.4, g.leg_w * 0.8)
    union(dist, t0, t1, 0.05, 0.03)
    alpha = _smoothstep(dist / edge)
    col = _coat(g, x, y, (xx[0], yy[:, 0], affine))
    # Shading: darker underneath and at the body's rim, so it reads as a rounded animal.
    r2 = (x / a) ** 2 + (y / b) ** 2
    shade = 1.0 - 0.18 * np.clip(y / b, -1, 1.5) - 0.25 * np.minimum(r2, 1) ** 3
    # Hooves, muzzle and tail tuft are dark; then the eye.
    dark = np.full_like(dist, -1.0)
    for at, r in [(bot, g.leg_w * 1.6) for _top, bot in legs] + [((mx, my), g.head_h * 0.7), (t1, 0.09)]:
        union(dark, at, at, r, r)
    dark = _smoothstep(dark / edge)[..., None] * 0.8
    col = col * shade[..., None] * (1 - dark) + 0.05 * dark
    eye_at = (hx + g.head_h * 0.5, hy - g.head_h * 0.2)
    eye = np.full_like(dist, -1.0)
    union(eye, eye_at, eye_at, 0.035, 0.035)
    eye = _smoothstep(eye / edge)[..., None]
    col += eye * (0.03 - col)
    view += alpha[..., None] * (col - view)
    ys, xs = np.nonzero(alpha > 0.5)
    if len(xs) == 0:
        return cx, cy, cx + 1, cy + 1
    return float(xs.min() + wx0), float(ys.min() + wy0), float(xs.max() + wx0), float(ys.max() + wy0)


def _occlude(img: np.ndarray, box: tuple[float, float, float, float], cam: _Camera, rng: np.random.Generator) -> None:
    """Vegetation in front of the animal: a trunk, a grass tuft or a bush."""
    h, w = img.shape[:2]
    x0, y0, x1, y1 = box
    kind = rng.integers(3)
    pal = cam.style
    if kind == 0:  # trunk / pole
        bw = rng.uniform(0.04, 0.14) * w
        bx = rng.uniform(x0, max(x0 + 1, x1))
        xx, yy = _grid(h, w)
        lean = rng.normal(0, 0.1)
        d = bw / 2 - np.abs(xx - bx - lean * (yy - h / 2))
        col = _jitter_colour(rng, pal[rng.integers(len(pal))] * 0.7, 0.05)
        _paint(img, _smoothstep(d), col)
    elif kind == 1:  # tall grass over the legs
        for _ in range(int(rng.integers(15, 40))):
            gx, gy = rng.uniform(x0 - 5, x1 + 5), h + 2
            length = rng.uniform(0.3, 0.7) * (h - y0 + 4)
            ang = -np.pi / 2 + rng.normal(0, 0.3)
            ex, ey = gx + length * math.cos(ang), gy + length * math.sin(ang)
            win = _local(h, w, (gx + ex) / 2, (gy + ey) / 2, length / 2 + 3)
            if win is None:
                continue
            sy, sx, lx, ly = win
            col = _jitter_colour(rng, pal[rng.integers(len(pal))], 0.08)
            _paint(img[sy, sx], _smoothstep(_capsule(lx, ly, (gx, gy), (ex, ey), rng.uniform(0.8, 2.0), 0.3)), col)
    else:  # bush
        # Sized and placed relative to the animal so it hides a part of it, never all of it.
        bw, bh = max(x1 - x0, 4.0), max(y1 - y0, 4.0)
        end = rng.uniform(-0.1, 0.3)
        bx = x0 + bw * (end if rng.random() < 0.5 else 1 - end)
        by = y0 + bh * rng.uniform(0.6, 1.0)
        a, b = rng.uniform(0.2, 0.4) * bw, rng.uniform(0.3, 0.6) * bh
        xx, yy = _grid(h, w)
        ragged = _random_field(rng, 6, 0.02, 0.06).grid(xx[0], yy[:, 0]) * 0.2 * min(a, b)
        d = _ellipse(xx, yy, bx, by, a, b) + ragged
        col = _jitter_colour(rng, 0.5 * pal[int(rng.choice([1, 3]))] + 0.5 * _FOLIAGE, 0.05)
        tex = col * (1 + 0.2 * _random_field(rng, 6, 0.03, 0.08).grid(xx[0], yy[:, 0]))[..., None]
        _paint(img, _smoothstep(d), tex)


def _render(spec: _ImageSpec, genome: _Genome, cam: _Camera, params: SynthParams) -> Image.Image:
    """One photo: background, animal, occluder, lighting, camera response, blur and noise."""
    h, w = params.height, params.width
    enc = spec.encounter
    rng = _rng(params.seed, _S_IMAGE, spec.identity, spec.index)
    img = _background(h, w, cam, enc, rng).astype(np.float32)
    box = _animal(img, genome, enc, rng)
    if enc.occluded and rng.random() < 0.7:
        _occlude(img, box, cam, rng)
    # Lighting: contrast, brightness, a directional gradient, colour cast and camera gamma.
    xx, yy = _grid(h, w)
    ang = enc.light_angle + rng.normal(0, 0.2)
    grad = 1 + enc.light_strength * ((xx / w - 0.5) * math.cos(ang) + (yy / h - 0.5) * math.sin(ang))
    bright = enc.brightness * rng.uniform(0.93, 1.07)
    contrast = enc.contrast * rng.uniform(0.95, 1.05)
    img = ((img - 0.5) * contrast + 0.5) * (grad[..., None] * (bright * cam.tint * enc.tint))
    pil = Image.fromarray((np.clip(img, 0.0, 1.0) * 255 + 0.5).astype(np.uint8))
    pil = pil.point(_gamma_lut(cam.gamma))
    radius = cam.blur + rng.uniform(0.0, 0.6)
    if radius > 0.15:
        pil = pil.filter(ImageFilter.GaussianBlur(radius))
    # Sensor noise: the sum of two uniform bytes is a cheap bell-shaped (triangular) noise.
    n = h * w * 3
    tri = np.frombuffer(rng.bytes(n), np.uint8).astype(np.int16) + np.frombuffer(rng.bytes(n), np.uint8) - 255
    sigma = cam.noise + rng.uniform(0, 3)
    out = np.asarray(pil, np.float32) + tri.reshape(h, w, 3) * np.float32(sigma / 104.5)
    return Image.fromarray((np.clip(out, 0, 255) + 0.5).astype(np.uint8))


def _gamma_lut(gamma: float) -> list[int]:
    """Per-channel 256-entry lookup table for ``Image.point``: gamma on uint8 costs nothing."""
    ramp = ((np.arange(256) / 255.0) ** gamma * 255 + 0.5).astype(np.uint8).tolist()
    return ramp * 3


# --------------------------------------------------------------------------------------------
# Writing the dataset folder.
# --------------------------------------------------------------------------------------------


def _encode(spec: _ImageSpec, genome: _Genome, cam: _Camera, params: SynthParams) -> bytes:
    buf = io.BytesIO()
    _render(spec, genome, cam, params).save(buf, format="JPEG", quality=params.jpeg_quality)
    return buf.getvalue()


def render_image(params: SynthParams, identity: int, index: int) -> np.ndarray:
    """Pixels (H, W, 3 uint8, before JPEG) of one image: for previews and debugging."""
    specs = _plan_identity(params, identity)
    genomes, _ = _genomes(params)
    return np.asarray(_render(specs[index], genomes[identity], _cameras(params)[specs[index].encounter.camera], params))


# Per-job state shared with forked render workers (set before the pool starts, inherited by
# fork), keyed by the temp folder so concurrent jobs in one process do not mix.
_WORK: dict[str, dict[str, Any]] = {}


def _render_identity(key: str, i: int) -> None:
    """Render and write all images of identity ``i`` (runs in a worker process or inline)."""
    job = _WORK[key]
    params, folder, genome, cams = job["params"], job["folder"], job["genomes"][i], job["cameras"]
    for spec in job["by_identity"][i]:
        (folder / spec.rel_path).write_bytes(_encode(spec, genome, cams[spec.encounter.camera], params))


def _write_dataset(params: SynthParams, folder: Path, workers: int) -> dict[str, Any]:
    """Render every image into ``folder`` and write metadata.csv and params.json."""
    genomes, parents = _genomes(params)
    by_identity = [_plan_identity(params, i) for i in range(params.identities)]
    specs = [s for group in by_identity for s in group]
    for i in range(params.identities):
        (folder / "images" / identity_name(i)).mkdir(parents=True, exist_ok=True)
    key = str(folder)
    _WORK[key] = dict(params=params, folder=folder, genomes=genomes, cameras=_cameras(params), by_identity=by_identity)
    try:
        # Rendering is many small numpy calls, so threads fight over the GIL; forked processes
        # scale. Every image has its own random stream, so the result is order-independent.
        # Small datasets (tests) render inline: a pool costs more than it saves there.
        # Daemonic processes (multiprocessing pool workers) may not start children.
        can_fork = "fork" in mp.get_all_start_methods() and not mp.current_process().daemon
        if workers > 1 and can_fork and len(specs) >= _MIN_IMAGES_FOR_POOL:
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
                ids = range(params.identities)
                list(pool.map(_render_identity, [key] * len(ids), ids, chunksize=4))
        else:
            for i in range(params.identities):
                _render_identity(key, i)
    finally:
        del _WORK[key]

    with open(folder / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(METADATA_COLUMNS)
        for s in specs:
            e = s.encounter
            ident = identity_name(s.identity)
            writer.writerow([s.image_id, ident, s.rel_path, f"cam{e.camera}", e.name, e.date, params.species])
    info = {
        "generator_version": GENERATOR_VERSION,
        "name": dataset_dir_name(params),
        "params": dataclasses.asdict(params),
        "counts": {
            "identities": params.identities,
            "images": len(specs),
            "encounters": len({s.encounter.name for s in specs}),
            "cameras": params.cameras,
            "lookalikes": len(parents),
        },
        "lookalike_parents": {identity_name(k): identity_name(v) for k, v in sorted(parents.items())},
    }
    (folder / "params.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def _complete(folder: Path) -> bool:
    return (folder / "metadata.csv").is_file()


def _default_workers() -> int:
    try:
        return max(1, min(8, len(os.sched_getaffinity(0))))
    except AttributeError:  # not on Linux
        return max(1, min(8, os.cpu_count() or 1))


def default_out_root() -> Path:
    """``$INDIVAID_DATA`` if set, else ``./data``."""
    return Path(os.environ.get("INDIVAID_DATA") or "./data")


def generate(
    params: SynthParams = SynthParams(), out_root: str | Path | None = None, workers: int | None = None
) -> Path:
    """Write the dataset for ``params`` under ``out_root`` (or reuse it) and return its folder.

    Idempotent and safe to call from several processes at once: the first one renders into a
    temporary folder and renames it; the others wait on the lock and reuse the result.
    """
    root = (Path(out_root) if out_root is not None else default_out_root()).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    name = dataset_dir_name(params)
    final = root / name
    if _complete(final):
        log.debug("reusing %s", final)
        return final
    with file_lock(root / f".{name}.lock"):
        if _complete(final):
            log.info("reusing %s (made by another process)", final)
            return final
        # Only the lock holder writes temp folders, so any left here are from a crashed run.
        for stale in root.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".{name}.tmp-{os.getpid()}"
        try:
            info = _write_dataset(params, tmp, workers or _default_workers())
            if final.exists():  # a broken folder without metadata.csv: replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("wrote %s: %d identities, %d images", final, info["counts"]["identities"], info["counts"]["images"])
    return final


def _iter_cli_fields() -> Iterator[tuple[str, dataclasses.Field]]:
    for f in dataclasses.fields(SynthParams):
        yield f.name.replace("_", "-"), f


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write (or reuse) a synthetic dataset and print its folder."""
    parser = argparse.ArgumentParser(prog="python -m indivaid.data.synth", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output root (default: $INDIVAID_DATA or ./data)")
    parser.add_argument("--workers", type=int, default=None, help="render processes (default: usable cpus, at most 8)")
    for flag, f in _iter_cli_fields():
        parser.add_argument(f"--{flag}", type=type(f.default), default=f.default, help=f"default: {f.default}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = SynthParams(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SynthParams)})
    path = generate(params, args.out, workers=args.workers)
    print(path)  # the CLI's output: the dataset folder, for scripts to capture
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
