"""Image cache, batched augmentations and the P x K sampler."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_image
from PIL import Image

from indivaid.data import DataError, SplitConfig, build_split, open_dataset
from indivaid.data.augment import AugmentConfig, normalize, random_erasing, random_pad_crop, train_transform
from indivaid.data.imagecache import ImageSpec, build_image_cache, load_image
from indivaid.data.sampler import PKSampler


@pytest.fixture(scope="module")
def small_split(small_catalogue):
    return build_split(small_catalogue, SplitConfig(seed=0))


def test_image_cache_matches_direct_decoding_and_is_reused(small_split, tmp_path: Path):
    spec = ImageSpec(32, 16)
    cache = build_image_cache(small_split, spec, tmp_path)
    assert len(cache) == small_split.table.height and cache.array.shape[1:] == (3, 32, 16)
    rows = small_split.table.sample(5, seed=0)
    got = cache[cache.rows(rows["image_id"].to_list())]
    for i, path in enumerate(rows["path"].to_list()):
        assert torch.equal(got[i], torch.from_numpy(load_image(path, (None,) * 4, spec)))
    stamp = (cache.folder / "images.u8").stat().st_mtime_ns
    again = build_image_cache(small_split, spec, tmp_path)
    assert again.folder == cache.folder and (again.folder / "images.u8").stat().st_mtime_ns == stamp
    assert build_image_cache(small_split, ImageSpec(32, 16, "letterbox"), tmp_path).folder != cache.folder
    assert not list(tmp_path.rglob("*.tmp-*"))


def _build(args):
    split, root = args
    return str(build_image_cache(split, ImageSpec(24, 12), root).folder)


def test_image_cache_concurrent_builders_share_one_result(small_split, tmp_path: Path):
    with mp.get_context("spawn").Pool(2) as pool:  # fork after polars threads start can deadlock
        folders = pool.map(_build, [(small_split, tmp_path)] * 2)
    assert folders[0] == folders[1] and len(list(tmp_path.glob("images-*"))) == 1


def test_letterbox_keeps_aspect_and_stretch_fills(tmp_path: Path):
    img = np.full((20, 80, 3), 250, np.uint8)  # a wide white image
    Image.fromarray(img).save(tmp_path / "w.png")
    box = load_image(str(tmp_path / "w.png"), (None,) * 4, ImageSpec(32, 32, "letterbox"))
    assert box[:, 16, :].min() > 240 and box[:, 0, :].max() == 127  # grey bars above and below
    assert load_image(str(tmp_path / "w.png"), (None,) * 4, ImageSpec(32, 32)).min() > 240


def test_image_cache_reports_every_undecodable_file(tmp_path: Path):
    for i in range(4):
        write_image(tmp_path / "data" / f"id{i % 2}" / f"{i}.jpg", seed=i)
    (tmp_path / "data" / "id0" / "0.jpg").write_bytes(b"garbage")
    (tmp_path / "data" / "id1" / "3.jpg").write_bytes(b"garbage")
    from indivaid.data.imagecache import _build  # two identities are too few to split: decode the rows

    cat = open_dataset("folder", path=tmp_path / "data")
    with pytest.raises(DataError, match=r"(?s)2 images could not be decoded.*0\.jpg.*3\.jpg"):
        _build(cat.table, ImageSpec(8, 8), tmp_path / "cache", 2)
    assert not list((tmp_path / "cache").glob("images.u8*"))  # no half-written cache left behind


def test_train_transform_shapes_ranges_and_per_image_randomness():
    imgs = torch.randint(0, 256, (64, 3, 32, 16), dtype=torch.uint8)
    cfg = AugmentConfig()
    out = train_transform(imgs, cfg, torch.Generator().manual_seed(0))
    assert out.shape == (64, 3, 32, 16) and out.dtype == torch.float32
    no_erase = train_transform(imgs, AugmentConfig(erase_p=0.0), torch.Generator().manual_seed(0))
    assert no_erase.min() >= -1 and no_erase.max() <= 1  # normalised pixels; erasing adds N(0, 1) noise
    again = train_transform(imgs, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # deterministic under a seeded generator
    plain = normalize(imgs, cfg)
    changed = (out != plain).flatten(1).any(1).float().mean()
    assert 0.5 < changed <= 1.0  # most images got some augmentation, drawn per image


def test_flip_only_flips_and_pad_crop_is_a_shift():
    imgs = torch.randint(0, 256, (32, 3, 8, 6), dtype=torch.uint8)
    cfg = AugmentConfig(flip_p=1.0, pad=0, erase_p=0.0)
    assert torch.equal(train_transform(imgs, cfg), normalize(imgs.flip(-1), cfg))
    x = torch.arange(2 * 1 * 8 * 6, dtype=torch.float32).view(2, 1, 8, 6) + 1
    out = random_pad_crop(x, 2, torch.Generator().manual_seed(1))
    for b in range(2):  # every output equals the zero-padded input at one offset
        padded = torch.nn.functional.pad(x[b], (2, 2, 2, 2))
        hits = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(padded[:, dy:dy + 8, dx:dx + 6], out[b])]
        assert len(hits) == 1


def test_random_erasing_pixel_mode_area_probability_and_noise():
    x = torch.full((2000, 3, 64, 32), 7.0)  # a value N(0, 1) noise never takes
    out = random_erasing(x, AugmentConfig(erase_p=0.5), torch.Generator().manual_seed(0))
    hit = out != 7.0
    assert torch.equal(hit[:, 0], hit[:, 1]) and torch.equal(hit[:, 0], hit[:, 2])  # one rectangle across channels
    frac = hit[:, 0].flatten(1).float().mean(1)
    erased = frac > 0
    assert 0.45 < erased.float().mean() < 0.55
    assert frac[erased].min() >= 0.015 and frac[erased].max() <= 1 / 3 + 0.01
    rows, cols = hit[:, 0].any(2), hit[:, 0].any(1)  # a filled rectangle: its area is rows x columns
    assert torch.equal(hit[:, 0].flatten(1).sum(1), rows.sum(1) * cols.sum(1))
    noise = out[hit]  # the reference's pixel mode: N(0, 1) per pixel and channel, in normalised units
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 1) < 0.01
    first = out[erased.nonzero()[0, 0]]
    assert not torch.equal(first[0][hit[erased][0, 0]], first[1][hit[erased][0, 0]])  # channels drawn apart
    assert torch.equal(random_erasing(x, AugmentConfig(erase_p=0.0), None), x)


def test_pk_sampler_structure_coverage_and_purity():
    labels = np.repeat(np.arange(20), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 2)
    s = PKSampler(labels, p=4, k=4, seed=0)
    batches = list(s)
    assert len(batches) == len(s) > 0
    seen = np.zeros(len(labels), int)
    for b in batches:
        ids, counts = np.unique(labels[b], return_counts=True)
        assert len(b) == 16 and len(ids) == 4 and (counts == 4).all()
        np.add.at(seen, b, 1)
    chunks = np.bincount(labels[np.concatenate(batches)], minlength=20) // 4  # batches each identity joined
    assert (chunks <= np.maximum(1, np.bincount(labels) // 4)).all()  # chunks of K; leftovers short of K dropped
    assert [b.tolist() for b in s] == [b.tolist() for b in batches]  # same epoch, same batches
    fresh = PKSampler(labels.copy(), p=4, k=4, seed=0)  # a pure function of (labels, seed, epoch)
    assert [b.tolist() for b in fresh.global_batches(0)] == [b.tolist() for b in batches]
    s.set_epoch(1)
    assert [b.tolist() for b in s] != [b.tolist() for b in batches]
    assert [b.tolist() for b in PKSampler(labels, 4, 4, seed=1)] != [b.tolist() for b in batches]
    with pytest.raises(ValueError, match="at least P=8 identities"):
        PKSampler(np.arange(3), p=8, k=4)


def test_pk_sampler_picks_identities_uniformly_not_by_image_count():
    """Like the reference RandomIdentitySampler: a 40-image identity leads no more often than a 4-image one."""
    labels = np.repeat(np.arange(16), [40] * 8 + [4] * 8)  # 8 big and 8 small identities
    s = PKSampler(labels, p=4, k=4, seed=0)
    first = np.concatenate([labels[s.global_batches(e)[0]][::4] for e in range(400)])  # 4 identities per batch
    big_share = np.isin(first, np.arange(8)).mean()
    assert 0.45 < big_share < 0.55  # proportional-to-images sampling would give ~0.9
    per_epoch = np.concatenate(s.global_batches(0))  # every image of a big identity: 10 chunks of K
    assert all((labels[per_epoch] == i).sum() <= 40 for i in range(8))


def test_pk_sampler_splits_one_global_batch_across_ranks():
    labels = np.repeat(np.arange(20), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 2)
    single = list(PKSampler(labels, 8, 4, seed=3))
    ranks = [list(PKSampler(labels, 8, 4, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)  # the same optimiser steps per epoch as one process
    for step, whole in enumerate(single):
        r0, r1 = ranks[0][step], ranks[1][step]
        assert len(r0) == len(r1) == 16 and np.array_equal(np.concatenate([r0, r1]), whole)
        assert not set(labels[r0]) & set(labels[r1])  # each identity on one rank, with all K of its images
    assert PKSampler(labels, 8, 4, rank=1, world_size=4).batch_size == 8
    with pytest.raises(ValueError, match=r"batch_p=6 .* over 4 DDP workers.*stage1.batch_p and stage2.batch_p"):
        PKSampler(labels, 6, 4, rank=0, world_size=4)
