"""GPU-hour estimates for ``--dry-run``: dataset sizes x epochs / measured throughput.

The rates are measured on one H200 with bf16 autocast for ViT-B/16 at 256x128 (method.md §8 and
BENCHMARKS.md); other input sizes scale with the number of patch tokens. They are a planning aid,
an upper bound for searches (ASHA usually stops many trials early), not a promise.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from indivaid.data.adapters import make_adapter, open_dataset
from indivaid.data.catalogue import DataError
from indivaid.data.split import build_split
from indivaid.methods import METHODS
from indivaid.training import TrainConfig
from indivaid.utils.io import data_root

log = logging.getLogger(__name__)

# images (or prompts) per second on one H200, bf16, ViT-B/16 at 256x128 (128 patch tokens)
STAGE2_TRAIN_IMG_S = 1988.0  # stage 2 end to end at batch 64 (BENCHMARKS.md)
INFERENCE_IMG_S = 10043.0  # image tower inference at batch 256 (method.md §8)
STAGE1_PROMPTS_S = 3052.0  # text tower fwd+bwd, 77-token prompts at batch 64 (method.md §8)
REFERENCE_TOKENS = (256 // 16) * (128 // 16)
RATED_BACKBONES = {"ViT-B-16": 16, "ViT-B-32": 32}  # backbone -> its native patch size


@dataclass(frozen=True)
class ImageCounts:
    """Images per part of a dataset's split; ``source`` says whether they were counted or published."""

    train: int
    val: int  # validation query + gallery
    test: int  # test query + gallery
    source: str  # "counted" | "published"


def image_counts(cfg: TrainConfig) -> ImageCounts | None:
    """Count the split of a present dataset, else fall back to the adapter's published counts."""
    d = cfg.data
    adapter = make_adapter(d.dataset, **d.options)
    where = Path(d.path).expanduser() if d.path else adapter.default_path(data_root(d.data_root), create=False)
    try:
        if not where.exists():  # never generate or download anything in a dry run
            raise DataError(f"{where} does not exist")
        split = build_split(open_dataset(d.dataset, d.path, d.data_root, **d.options), d.split)
    except (DataError, OSError) as e:
        log.debug("%s: not counted (%s)", d.dataset, e)
        expected = adapter.info.expected
        if "train" not in expected:
            return None
        test = sum(expected[p][1] for p in ("query", "gallery") if p in expected)
        train = expected["train"][1]
        val = round(train * d.split.val_fraction)  # carved from the published train part
        return ImageCounts(train - val, val, test, "published")

    def n(stage: str) -> int:
        q, g = split.query_gallery(stage)  # type: ignore[arg-type]
        return q.height + (0 if split.leave_one_out else g.height)

    return ImageCounts(split.part("train").height, n("val"), n("test"), "counted")


def trial_gpu_seconds(cfg: TrainConfig, counts: ImageCounts, evaluate_test: bool) -> float | None:
    """One trial's work at full budget, in GPU-seconds (None for a backbone without measured rates)."""
    patch = RATED_BACKBONES.get(cfg.model.backbone)
    if patch is None:
        return None
    h, w = cfg.model.input_size
    tokens = ((h - patch) // cfg.model.stride + 1) * ((w - patch) // cfg.model.stride + 1)  # as the model's grid
    scale = tokens / REFERENCE_TOKENS
    features = (counts.train + counts.val + counts.test) / INFERENCE_IMG_S * scale  # frozen or zero-shot features
    evals = counts.val * (1 + cfg.stage2.epochs // cfg.eval.every) + (counts.test if evaluate_test else 0)
    seconds = features + evals / INFERENCE_IMG_S * scale
    if METHODS.get(cfg.method).train:
        s1_batch = cfg.stage1.batch_p * cfg.stage1.batch_k
        s1_steps = max(cfg.stage1.epochs * math.ceil(counts.train / s1_batch), cfg.stage1.min_steps)
        seconds += s1_steps * s1_batch / STAGE1_PROMPTS_S
        seconds += cfg.stage2.epochs * counts.train / STAGE2_TRAIN_IMG_S * scale
    return seconds
