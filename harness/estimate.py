"""GPU-hour estimates for ``--dry-run``: dataset sizes x epochs / measured throughput.

The rates are measured on one H200 with bf16 autocast for ViT-B/16 at 256x128 (docs/method.md §8 and
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
from indivaid.models.backbone import patch_grid
from indivaid.training import TrainConfig
from indivaid.utils.io import data_root

log = logging.getLogger(__name__)

# images (or prompts) per second on one H200, bf16, ViT-B/16 at 256x128 (128 patch tokens)
STAGE2_TRAIN_IMG_S = 1988.0  # stage 2 end to end at batch 64 (BENCHMARKS.md)
INFERENCE_IMG_S = 10043.0  # image tower inference at batch 256 (docs/method.md §8)
STAGE1_PROMPTS_S = 3052.0  # text tower fwd+bwd, 77-token prompts at batch 64 (docs/method.md §8)
REFERENCE_TOKENS = (256 // 16) * (128 // 16)
RATED_BACKBONES = {"ViT-B-16": 16, "ViT-B-32": 32}  # backbone -> its native patch size


@dataclass(frozen=True)
class ImageCounts:
    """Images per part of a dataset's split; ``source`` says whether they were counted or published."""

    train: int
    val: int  # validation query + gallery
    test: int  # test query + gallery
    source: str  # "counted" | "published"
    train_ids: int = 0  # training identities left after the validation carve


def published_counts(cfg: TrainConfig) -> ImageCounts | None:
    """The split sizes implied by the adapter's published counts (None for datasets without them)."""
    d = cfg.data
    expected = make_adapter(d.dataset, **d.options).info.expected
    if "train" not in expected:
        return None
    test = sum(expected[p][1] for p in ("query", "gallery") if p in expected)
    ids, train = expected["train"]
    val_ids = max(1, round(d.split.val_fraction * ids)) if d.split.val_fraction > 0 else 0  # as build_split carves
    val = round(train * val_ids / ids)  # carved from the published train part
    return ImageCounts(train - val, val, test, "published", ids - val_ids)


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
        return published_counts(cfg)

    def n(stage: str) -> int:
        q, g = split.query_gallery(stage)  # type: ignore[arg-type]
        return q.height + (0 if split.leave_one_out else g.height)

    return ImageCounts(split.part("train").height, n("val"), n("test"), "counted", len(split.train_identities()))


def trial_gpu_seconds(cfg: TrainConfig, counts: ImageCounts, evaluate_test: bool) -> float | None:
    """One trial's work at full budget, in GPU-seconds (None for a backbone without measured rates)."""
    patch = RATED_BACKBONES.get(cfg.model.backbone)
    if patch is None:
        return None
    gh, gw = patch_grid(cfg.model.backbone, cfg.model.input_size, cfg.model.stride)  # as the model's grid
    tokens = gh * gw
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


def _param_counts(cfg: TrainConfig, num_ids: int) -> tuple[int, int]:
    """(parameters stage 2 trains, prompt parameters) of ``cfg``'s real backbone and method.

    The image tower is built on the meta device (no memory, no weights); the small modules are
    counted from their shapes. Rehearsals run a tiny model, so this is how they size the disk a
    cluster sweep needs.
    """
    import torch

    from harness.config import applies
    from indivaid.models.backbone import build_clip

    spec = METHODS.get(cfg.method)
    if not spec.train:
        return 0, 0
    m = cfg.model
    with torch.device("meta"):
        clip = build_clip(m.backbone, None, tuple(m.input_size), m.stride, None, m.quick_gelu)
    visual = sum(p.numel() for p in clip.visual.parameters())
    width, dim = clip.visual.transformer.width, clip.text_projection.shape[1]
    text_width = clip.token_embedding.weight.shape[1]
    head = num_ids * (width + dim) + 4 * (width + dim)  # two classifiers, two BNNecks (with running stats)
    fusion = 4 * dim * dim + 4 * dim if applies("fusion.heads", spec) else 0  # attention in/out projections
    prompt = num_ids * cfg.prompt.n_ctx * text_width + (2 * dim * (dim // 16) + dim // 16 + dim if spec.meta_net else 0)
    return visual + head + fusion, prompt


def train_state_bytes(cfg: TrainConfig, num_ids: int) -> int:
    """Bytes of one stage-2 training checkpoint: fp32 weights of what stage 2 trains and the prompts,
    plus Adam's two moments of what it trains."""
    trained, prompt = _param_counts(cfg, num_ids)
    return 4 * (3 * trained + prompt)


def inference_bytes(cfg: TrainConfig, num_ids: int) -> int:
    """Bytes of the inference model (``model.pt``): fp32 image tower and head."""
    return 4 * _param_counts(cfg, num_ids)[0]


def checkpoint_every(cfg: TrainConfig, counts: ImageCounts | None, policy, workers: int = 1) -> int | None:
    """Epochs between checkpoints that ``policy`` gives a trial of ``cfg`` on ``workers`` GPUs
    (0: no mid-run checkpoint); None where there is no GPU estimate to go by."""
    if counts is None or not METHODS.get(cfg.method).train:
        return None
    total = trial_gpu_seconds(cfg, counts, evaluate_test=True)
    if total is None:
        return None
    wall = total / max(1, workers)
    if wall < 60 * policy.min_run_minutes:
        return 0
    epoch = wall * (trial_gpu_seconds(cfg, counts, False) or total) / total / max(1, cfg.stage2.epochs)
    return max(1, round(60 * policy.every_minutes / epoch))


def apply_checkpoint_policy(sweep):
    """The sweep with each GPU dataset's ``checkpoint.every`` set by ``sweep.checkpoint_policy``.

    Published counts are preferred to counted ones, so the decision (part of every trial's config
    hash, which resumes check) does not change when a dataset's files appear later.
    """
    import dataclasses

    from harness.checks import gpus_per_trial
    from harness.config import trial_config
    from indivaid.training.config import merge

    if not sweep.checkpoint_policy.enabled:
        return sweep
    trained = [m for m in sweep.methods if METHODS.get(m).train]
    per_dataset = dict(sweep.per_dataset)
    for d in sweep.datasets:
        if not trained or not gpus_per_trial(sweep, d):
            continue
        cfg = trial_config(sweep, d, trained[0], {})
        every = checkpoint_every(cfg, published_counts(cfg) or image_counts(cfg), sweep.checkpoint_policy,
                                 sweep.resources_for(d).workers)
        if every is not None:
            per_dataset[d] = merge(per_dataset.get(d, {}), {"checkpoint": {"every": every}})
    return dataclasses.replace(sweep, per_dataset=per_dataset)
