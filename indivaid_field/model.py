"""An exported model (``python -m indivaid export``) run through ONNX Runtime.

The graph maps a normalised ``image`` batch (float32, N x 3 x H x W, RGB) to the raw re-ID
``feature`` and its L2-normalised ``embedding``. Everything else a caller needs travels in the
ONNX metadata (:data:`METADATA_KEYS`): the input size and resize policy, the normalisation
constants, the distance, the model fingerprint that embedding files record, and, for open-set
checkpoints, the KNOWN/NEW threshold calibrated on validation with its probability mapping.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indivaid_field import FieldError
from indivaid_field.preprocess import load_batch, normalize

ONNX_FORMAT = "indivaid-onnx/1"
INPUT_NAME = "image"
OUTPUT_NAMES = ("feature", "embedding")
#: Metadata keys of an exported model; every value is JSON.
METADATA_KEYS = ("format", "model_version", "indivaid_version", "input_height", "input_width", "resize",
                 "pixel_scale", "mean", "std", "layout", "embedding_dim", "embedding_normalization", "metric",
                 "threshold", "threshold_rule", "probability", "method", "backbone", "dataset", "species",
                 "split_hash", "checkpoint")


@dataclass(frozen=True)
class ImageSize:
    """The exported model's fixed input (an ``indivaid_field.preprocess.SizeSpec``)."""

    height: int
    width: int
    resize: str


def read_metadata(raw: dict[str, str], source: str) -> dict[str, Any]:
    """Decode an exported model's metadata (JSON values); refuses graphs indivaid did not export."""
    try:
        meta = {k: json.loads(v) for k, v in raw.items() if k in METADATA_KEYS}
    except ValueError as e:
        raise FieldError(f"{source}: unreadable indivaid metadata ({e})") from None
    if meta.get("format") != ONNX_FORMAT:
        raise FieldError(f"{source}: not a model exported by `python -m indivaid export` (format "
                         f"{meta.get('format')!r}, expected {ONNX_FORMAT!r})")
    return meta


class OnnxModel:
    """Embeds photos with an exported model; exposes what ``match`` needs (metric, threshold)."""

    def __init__(self, path: str | Path, *, threads: int | None = None, providers: Sequence[str] | None = None) -> None:
        import onnxruntime as ort

        file = Path(path)
        if not file.is_file():
            raise FieldError(f"--onnx {file}: not found; make it with `python -m indivaid export`")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # warnings about unused initialisers are noise to a field user
        try:
            self.session = ort.InferenceSession(str(file), opts, providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as e:  # noqa: BLE001 (onnxruntime's own exception types, not importable by name)
            raise FieldError(f"--onnx {file}: ONNX Runtime cannot load it ({type(e).__name__}: {e})") from None
        self.path = file
        self.meta = read_metadata(self.session.get_modelmeta().custom_metadata_map, f"--onnx {file}")

    @property
    def size(self) -> ImageSize:
        return ImageSize(int(self.meta["input_height"]), int(self.meta["input_width"]), str(self.meta["resize"]))

    @property
    def fingerprint(self) -> str:
        """The model version that embedding files record (the same as the torch checkpoint's)."""
        return str(self.meta["model_version"])

    @property
    def metric(self) -> str:
        return str(self.meta["metric"])

    @property
    def dim(self) -> int:
        return int(self.meta["embedding_dim"])

    @property
    def threshold(self) -> float | None:
        t = self.meta.get("threshold")
        return None if t is None else float(t)

    @property
    def probability(self) -> tuple[float, float] | None:
        p = self.meta.get("probability")
        return None if p is None else (float(p[0]), float(p[1]))

    @property
    def threshold_rule(self) -> str:
        return str(self.meta.get("threshold_rule") or "")

    def run(self, images: np.ndarray, output: str = "embedding") -> np.ndarray:
        """uint8 ``B x 3 x H x W`` at the model's size -> float32 ``(B, D)`` (``feature`` or ``embedding``)."""
        x = normalize(images, self.meta["mean"], self.meta["std"])
        return self.session.run([output], {INPUT_NAME: x})[0]

    def embed_files(self, paths: Sequence[str | Path], bboxes: Sequence[Sequence[float | None]] | None = None,
                    batch: int = 32, output: str = "embedding") -> np.ndarray:
        """L2-normalised embeddings (``output="feature"``: raw features) of image files, cropped to
        ``bboxes`` ((x, y, w, h) or Nones) when given."""
        boxes = list(bboxes) if bboxes is not None else [(None,) * 4] * len(paths)
        parts = [self.run(load_batch(paths[s : s + batch], boxes[s : s + batch], self.size), output)
                 for s in range(0, len(paths), batch)]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)
