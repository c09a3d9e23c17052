"""Attention fusion must learn: it starts at the mean of an identity's image-specific descriptions
and must leave it in training, so that IndivAID and IndivAID-mean are different models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_trainer import micro_config

from indivaid.config import ConfigError
from indivaid.data import read_split
from indivaid.data.imagecache import ImageSpec, build_image_cache
from indivaid.inference import load_inference
from indivaid.models.fusion import build_fusion, departure_from_mean, pad_descriptions
from indivaid.training import load_config, resolve, train
from indivaid.training.config import FusionConfig


def test_departure_is_zero_at_the_start_positive_once_moved_and_nan_without_weights():
    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    desc, mask = pad_descriptions(torch.randn(len(labels), 16), labels, 3)
    attention = build_fusion("attention", 16, FusionConfig(heads=4))
    assert departure_from_mean(attention, desc, mask) == 0.0  # zero output projection: exactly the mean
    with torch.no_grad():
        attention.attn.out_proj.weight.normal_()
        fused, mean = attention(desc, mask), (desc * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    expected = float(((fused - mean).norm(dim=1) / mean.norm(dim=1)).mean())
    assert departure_from_mean(attention, desc, mask) == pytest.approx(expected, rel=1e-5) and expected > 0
    assert math.isnan(departure_from_mean(build_fusion("mean", 16, FusionConfig()), desc, mask))


def test_the_former_relative_fusion_lr_key_names_its_successor():
    with pytest.raises(ConfigError, match=r"fusion\.lr_factor: unknown key \(renamed: use fusion\.lr, an absolute"):
        load_config(None, ["fusion.lr_factor=0.1"])


@pytest.fixture(scope="module")
def fusion_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fusion-cache")


def _run(data_root: Path, cache: Path, workdir: Path, method: str, *overrides: str):
    cfg = micro_config(data_root, cache, "stage1.epochs=1", "stage2.epochs=3", "stage2.milestones=[]",
                       "checkpoint.every=0", "eval.every=3", *overrides, method=method)
    res = train(cfg, workdir=workdir, evaluate_test=False)
    model = load_inference(res.checkpoint)
    return res, model


def test_attention_fusion_leaves_the_mean_and_changes_the_model(data_root: Path, fusion_cache: Path, tmp_path: Path):
    """The departure grows well above zero at the default fusion.lr; IndivAID and IndivAID-mean with
    one seed then embed the same images differently, while a fusion held at the mean (lr ~ 0) gives
    IndivAID-mean's embeddings: the difference is the fusion's doing, nothing else."""
    attention, a_model = _run(data_root, fusion_cache, tmp_path / "attention", "indivaid")
    mean, m_model = _run(data_root, fusion_cache, tmp_path / "mean", "indivaid-mean")
    held, h_model = _run(data_root, fusion_cache, tmp_path / "held", "indivaid", "fusion.lr=1e-12")
    departure = [h["fusion_departure"] for h in attention.history if h["stage"] == 2]
    assert 0 < departure[0] < departure[1] < departure[2] and departure[2] > 0.02, departure
    assert attention.fusion_departure == departure[-1]
    assert all(math.isnan(h["fusion_departure"]) for h in mean.history) and math.isnan(mean.fusion_departure)
    assert held.fusion_departure < 1e-6

    images = _some_images(tmp_path / "attention")
    a, m, h = (model.embed_uint8(images) for model in (a_model, m_model, h_model))
    assert (a - m).abs().max() > 5e-4  # 3e-3 when written
    assert torch.allclose(h, m, atol=1e-5)


def _some_images(workdir: Path) -> torch.Tensor:
    """Eight of the run's images, as the uint8 cache holds them."""
    cfg = resolve(json.loads((workdir / "config.json").read_text()))
    cache = build_image_cache(read_split(workdir / "split.csv"), ImageSpec(*cfg.model.input_size, cfg.data.resize),
                              cfg.data.cache_dir)
    return cache[list(range(8))]
