"""Photos to model input, as numpy: the one preprocessing both torch and ONNX Runtime paths use.

Training decodes every image once into a uint8 cache with :func:`load_image`; inference (torch or
ONNX) must see exactly the same pixels, or the embeddings of a photo differ between the two. The
function therefore lives here, free of torch, and ``indivaid.data.imagecache`` re-exports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from indivaid_field import FieldError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LETTERBOX_FILL = 127  # neutral grey: ~0 after normalisation with mean 0.5


class SizeSpec(Protocol):
    """What :func:`load_image` needs to know (``indivaid.data.imagecache.ImageSpec`` is one)."""

    height: int
    width: int
    resize: str


def find_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted for determinism."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def identity_from_folder(path: Path, root: Path) -> str | None:
    """``root/<identity>/<photo>`` gives the identity; a photo directly in ``root`` has none."""
    rel = path.relative_to(root)
    return rel.parts[0] if len(rel.parts) > 1 else None


def load_image(path: str, bbox: Sequence[float | None], spec: SizeSpec) -> np.ndarray:
    """Decode, crop and resize one image to ``3 x H x W`` uint8 (bicubic, as the references)."""
    from PIL import Image

    with Image.open(path) as img:
        if bbox[0] is None:
            # JPEG draft mode decodes at a reduced scale that is still >= 2x the target size.
            img.draft("RGB", (spec.width * 2, spec.height * 2))
        img = img.convert("RGB")
        if bbox[0] is not None:
            x, y, w, h = (float(v) for v in bbox)  # type: ignore[arg-type]
            img = img.crop((round(x), round(y), round(x + w), round(y + h)))
        if spec.resize == "stretch":
            img = img.resize((spec.width, spec.height), Image.Resampling.BICUBIC)
            arr = np.asarray(img)
        else:
            scale = min(spec.width / img.width, spec.height / img.height)
            w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
            small = np.asarray(img.resize((w, h), Image.Resampling.BICUBIC))
            arr = np.full((spec.height, spec.width, 3), LETTERBOX_FILL, np.uint8)
            top, left = (spec.height - h) // 2, (spec.width - w) // 2
            arr[top : top + h, left : left + w] = small
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def load_batch(paths: Sequence[str | Path], bboxes: Sequence[Sequence[float | None]], spec: SizeSpec) -> np.ndarray:
    """``B x 3 x H x W`` uint8 of image files; an unreadable file is an error naming it."""
    out = []
    for p, b in zip(paths, bboxes):
        try:
            out.append(load_image(str(p), b, spec))
        except (OSError, ValueError) as e:
            raise FieldError(f"{p}: cannot read the image ({type(e).__name__}: {e})") from None
    return np.stack(out)


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 ``B x 3 x H x W`` -> float32 ``(x / 255 - mean) / std``, as the torch test transform."""
    m = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, 3, 1, 1)
    return (images.astype(np.float32) / np.float32(255.0) - m) / s


def parse_bbox(value: object, where: str) -> tuple[float, float, float, float] | None:
    """A table's ``bbox`` cell (``[x, y, width, height]``, or empty) as floats."""
    import ast

    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    raw = value
    try:
        if isinstance(value, str):
            value = ast.literal_eval(value)
        x, y, w, h = (float(v) for v in value)  # type: ignore[union-attr]
    except (ValueError, SyntaxError, TypeError):
        raise FieldError(f"{where}: bbox {raw!r} is not a list [x, y, width, height]") from None
    if w <= 0 or h <= 0:
        raise FieldError(f"{where}: bbox {raw!r} has a non-positive width or height")
    return x, y, w, h
