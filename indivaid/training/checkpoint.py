"""Training checkpoints (resumable) and the self-contained inference checkpoint.

Training checkpoints hold only what training changes: the trainable modules (never the frozen
text tower; the image tower only once stage 2 trains it), optimiser, scheduler position and RNG
state. They are written atomically, keeping the last one, and loaded with ``weights_only=True``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from indivaid.utils.io import atomic_write_bytes

TRAIN_FORMAT = "indivaid-train/1"
INFERENCE_FORMAT = "indivaid-inference/2"  # 2: head fields named by feature (bn_f12, cls_fproj), not width


def save(obj: dict[str, Any], path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load(path: Path, expected_format: str) -> dict[str, Any]:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != expected_format:
        raise ValueError(f"{path}: not an {expected_format} checkpoint (format={obj.get('format') if isinstance(obj, dict) else type(obj)})")
    return obj


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
