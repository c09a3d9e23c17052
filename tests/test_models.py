"""Model pieces: positional-embedding resize, encoders, prompts, fusion, losses, weight loading."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from indivaid.losses import batch_hard_triplet, pairwise_euclidean, supcon
from indivaid.models.backbone import BACKBONES, WeightsError, adapt_visual, build_clip, model_config, output_grid, resize_pos_embed
from indivaid.models.encoders import ImageEncoder, TextEncoder
from indivaid.models.fusion import FUSIONS, build_fusion, pad_descriptions
from indivaid.models.head import ReIDHead
from indivaid.models.prompt import PromptLearner
from indivaid.training.config import FusionConfig


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return build_clip("tiny", None, (64, 32), 16)


def test_pos_embed_resize_same_grid_is_identity_and_shapes_for_reid_sizes():
    pos = torch.randn(1 + 14 * 14, 768)
    assert resize_pos_embed(pos, (14, 14), (14, 14)) is pos
    for stride, grid in ((16, (16, 8)), (12, (21, 10))):
        assert output_grid((256, 128), 16, stride) == grid
        new = resize_pos_embed(pos, (14, 14), grid)
        assert new.shape == (1 + grid[0] * grid[1], 768) and torch.equal(new[0], pos[0])  # CLS kept
    const = torch.ones(1 + 4 * 4, 8)
    assert torch.allclose(resize_pos_embed(const, (4, 4), (7, 3)), torch.ones(1 + 21, 8))


def test_adapted_vit_runs_at_new_size_and_stride():
    torch.manual_seed(0)
    clip = build_clip("tiny", None, (64, 32), 16)
    adapt_visual(clip.visual, (80, 40), 12)
    enc = ImageEncoder(clip.visual, num_cameras=3)
    f = enc(torch.randn(2, 3, 80, 40), torch.tensor([0, 3]))  # camera 3 = unseen -> the zero row
    assert f.f11.shape == (2, 64) and f.f12.shape == (2, 64) and f.fproj.shape == (2, 32)
    assert clip.visual.positional_embedding.shape[0] == 1 + 6 * 3
    assert torch.count_nonzero(enc.camera_embed[-1]) == 0


def test_image_encoder_matches_open_clip_projection(tiny_clip):
    enc = ImageEncoder(tiny_clip.visual).eval()
    x = torch.randn(3, 3, 64, 32)
    with torch.no_grad():
        assert torch.allclose(enc(x).fproj, tiny_clip.visual(x), atol=1e-5)


def test_text_encoder_matches_open_clip_encode_text(tiny_clip):
    from open_clip.tokenizer import tokenize

    text = TextEncoder(tiny_clip)
    ids = tokenize(["a photo of a tiger."], context_length=24)
    with torch.no_grad():
        ours = text(tiny_clip.token_embedding(ids), ids.argmax(-1))
        ref = tiny_clip.encode_text(ids)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_prompt_learner_batches_identity_tokens_and_meta_net(tiny_clip):
    text = TextEncoder(tiny_clip)
    pl = PromptLearner(text, num_ids=5, species="polar bear", n_ctx=4, meta_net=True, embed_dim=32)
    emb, eot = pl(torch.tensor([0, 3, 3]), torch.randn(3, 32))
    assert emb.shape == (3, 24, 32) and (eot == eot[0]).all()
    n_prefix = pl.prefix.shape[1]
    # same identity, different images -> the same ctx tokens shifted by different pi(x)
    assert not torch.allclose(emb[1, n_prefix : n_prefix + 4], emb[2, n_prefix : n_prefix + 4])
    plain, _ = pl.forward_plain(torch.tensor([3]))
    assert torch.equal(plain[0, n_prefix : n_prefix + 4], pl.ctx[3])
    with pytest.raises(ValueError, match="does not fit"):
        PromptLearner(text, 2, " ".join(["tiger"] * 30))


def test_attention_fusion_starts_exactly_at_the_mean():
    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    desc = torch.randn(7, 16)
    padded, mask = pad_descriptions(desc, labels, 3)
    assert padded.shape == (3, 3, 16) and mask.sum().item() == 7
    mean = build_fusion("mean", 16, FusionConfig())(padded, mask)
    manual = torch.stack([desc[labels == c].mean(0) for c in range(3)])
    assert torch.allclose(mean, manual, atol=1e-6)
    attn = build_fusion("attention", 16, FusionConfig(heads=4))
    assert torch.equal(attn(padded, mask), mean)
    # once trained away from zero, attention moves T away from the mean
    torch.nn.init.normal_(attn.attn.out_proj.weight)
    assert not torch.allclose(attn(padded, mask), mean)
    with pytest.raises(ValueError, match="fusion.heads: 5 does not divide"):
        build_fusion("attention", 16, FusionConfig(heads=5))


def test_attention_fusion_equals_multihead_attention_on_the_mean_query():
    """The fast path (no projection of the descriptions) is nn.MultiheadAttention with the mean as
    query, in value and in every parameter gradient, with skewed identity sizes and padding."""
    torch.manual_seed(0)
    counts = torch.tensor([1, 2, 7, 3, 12])
    labels = torch.repeat_interleave(torch.arange(5), counts)
    padded, mask = pad_descriptions(torch.randn(len(labels), 32), labels, 5)
    fusion = build_fusion("attention", 32, FusionConfig(heads=4))
    for p in fusion.parameters():
        torch.nn.init.normal_(p, std=0.3)
    def reference(x: torch.Tensor) -> torch.Tensor:
        mean = x.sum(1) / mask.sum(1, keepdim=True)  # the padding is zero
        out, _ = fusion.attn(mean.unsqueeze(1), x, x, key_padding_mask=~mask, need_weights=False)
        return mean + out.squeeze(1)

    out, ref = fusion(padded, mask), reference(padded)
    assert torch.allclose(out, ref, atol=1e-5)
    g_fast = torch.autograd.grad(out.square().sum(), list(fusion.parameters()))
    g_ref = torch.autograd.grad(ref.square().sum(), list(fusion.parameters()))
    for a, b in zip(g_fast, g_ref):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    other = padded * 2  # another description cache: the memoised mean is not reused
    assert torch.allclose(fusion(other, mask), reference(other), atol=1e-5)
    padded.mul_(3)  # the same cache modified in place: recomputed too
    assert torch.allclose(fusion(padded, mask), reference(padded), atol=1e-5)


@pytest.mark.parametrize("name", FUSIONS.names())
def test_every_fusion_maps_masked_descriptions_to_one_per_identity(name: str):
    """The registry contract: (C, N, D) + mask -> (C, D), padding ignored, searchable keys real."""
    torch.manual_seed(0)
    cls = FUSIONS.get(name)
    fusion = build_fusion(name, 16, FusionConfig(heads=4))
    labels = torch.tensor([0, 1, 1, 2, 2, 2]) if cls.per_image else torch.arange(3)
    desc = torch.randn(len(labels), 16)
    padded, mask = pad_descriptions(desc, labels, 3)
    out = fusion(padded, mask)
    assert out.shape == (3, 16) and out.dtype == torch.float32 and torch.isfinite(out).all()
    garbage = padded.masked_fill(~mask.unsqueeze(-1), 1e6)  # whatever sits in the padding is ignored
    assert torch.allclose(fusion(garbage, mask), out, atol=1e-5)
    assert set(cls.keys) <= set(FusionConfig.__dataclass_fields__)  # keys a sweep may search exist
    assert bool(list(fusion.parameters())) == ("lr" in cls.keys)  # fusion.lr only matters with weights
    if not cls.per_image:  # one text per identity: fusion returns it unchanged
        assert torch.allclose(out, desc, atol=1e-6)


def test_supcon_matches_definition_and_triplet_is_finite():
    torch.manual_seed(0)
    logits = torch.randn(4, 4)
    labels = torch.tensor([0, 0, 1, 2])
    logp = torch.log_softmax(logits, 1)
    manual = torch.stack([-(logp[i][labels == labels[i]]).mean() for i in range(4)]).mean()
    assert torch.allclose(supcon(logits, labels, labels), manual)
    x = torch.randn(8, 5).to(torch.bfloat16)
    x[1] = x[0]  # identical rows: distance 0 without NaN
    d = pairwise_euclidean(x)
    assert d.dtype == torch.float32 and torch.isfinite(d).all()
    loss = batch_hard_triplet(x.float().requires_grad_(), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    loss.backward()
    assert torch.isfinite(loss)


def test_missing_pretrained_weights_fail_fast_with_instructions(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(WeightsError, match="local checkpoint file") as e:
        build_clip("ViT-B-16", "openai", (256, 128), 16, cache_dir=str(tmp_path))
    assert time.perf_counter() - t < 1.0 and "HF_HUB_OFFLINE" in str(e.value)
    with pytest.raises(WeightsError, match="neither a file, an open_clip folder, an hf-hub: repo nor an open_clip tag"):
        build_clip("ViT-B-16", "no-such-tag", (256, 128), 16)


def test_local_checkpoint_loads_strictly_and_mismatch_fails(tiny_clip, tmp_path: Path):
    path = tmp_path / "tiny_clip.pt"
    torch.save(tiny_clip.state_dict(), path)
    again = build_clip("tiny", str(path), (64, 32), 16)
    assert torch.equal(again.visual.conv1.weight, tiny_clip.visual.conv1.weight)
    torch.save({k: v for k, v in tiny_clip.state_dict().items() if not k.startswith("visual.ln_post")}, path)
    with pytest.raises(WeightsError, match="does not fit"):
        build_clip("tiny", str(path), (64, 32), 16)


def save_open_clip_folder(model: torch.nn.Module, backbone: str, folder: Path, **cfg_extra) -> Path:
    """``model`` as open_clip writes a hub repo: open_clip_config.json + open_clip_model.safetensors."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model.visual.image_mean, model.visual.image_std = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    save_config_for_hf(model, folder / "open_clip_config.json", model_config={**model_config(BACKBONES.get(backbone)), **cfg_extra})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    return folder


def hub_cache(root: Path, repo_id: str, snapshot: Path) -> Path:
    """A Hugging Face cache holding ``snapshot``'s files as repo ``repo_id`` (the layout hf_hub_download reads)."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    for f in snapshot.iterdir():
        (repo / "snapshots" / commit / f.name).write_bytes(f.read_bytes())
    return root


def test_open_clip_format_loads_from_its_weights_file_and_its_folder(tiny_clip, tmp_path: Path):
    folder = save_open_clip_folder(tiny_clip, "tiny", tmp_path / "tiny-clip")
    for pretrained in (str(folder / "open_clip_model.safetensors"), str(folder), f"local-dir:{folder}"):
        again = build_clip("tiny", pretrained, (64, 32))
        assert torch.equal(again.visual.conv1.weight, tiny_clip.visual.conv1.weight)
        assert torch.equal(again.text_projection, tiny_clip.text_projection)
    (folder / "open_clip_model.safetensors").unlink()
    with pytest.raises(WeightsError, match="needs open_clip_config.json and one of"):
        build_clip("tiny", str(folder), (64, 32))


def test_hf_hub_tag_loads_offline_from_a_local_cache(tiny_clip, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = hub_cache(tmp_path / "hf", "zoo/tiny-clip", save_open_clip_folder(tiny_clip, "tiny", tmp_path / "snap"))
    gelu = save_open_clip_folder(tiny_clip, "tiny", tmp_path / "snap-q", quick_gelu=True)
    hub_cache(cache, "zoo/tiny-clip-quickgelu", gelu)
    t = time.perf_counter()
    clip = build_clip("tiny", "hf-hub:zoo/tiny-clip", (64, 32), cache_dir=str(cache))
    assert time.perf_counter() - t < 5.0  # no network wait
    assert torch.equal(clip.visual.conv1.weight, tiny_clip.visual.conv1.weight) and not clip.uses_quick_gelu
    assert build_clip("tiny", "hf-hub:zoo/tiny-clip-quickgelu", (64, 32), cache_dir=str(cache)).uses_quick_gelu
    with pytest.raises(WeightsError, match=r"different architecture than backbone 'small'.*set model.backbone: tiny"):
        build_clip("small", "hf-hub:zoo/tiny-clip", (128, 64), cache_dir=str(cache))
    with pytest.raises(WeightsError, match="not in the local Hugging Face cache.*HF_HUB_OFFLINE"):
        build_clip("tiny", "hf-hub:zoo/not-cached", (64, 32), cache_dir=str(cache))
    with pytest.raises(WeightsError, match="hf-hub:<owner>/<repo>"):
        build_clip("tiny", "hf-hub:bioclip", (64, 32), cache_dir=str(cache))


def test_vit_l14_stride_defaults_to_its_patch_and_head_widths_come_from_the_model():
    from indivaid.training import resolve

    assert resolve({"model": {"backbone": "ViT-L-14"}}).model.stride == 14
    assert resolve({"model": {"backbone": "ViT-B-16"}}).model.stride == 16
    with pytest.raises(ValueError, match="model.stride: 16 is larger than the ViT-L-14 patch size 14"):
        resolve({"model": {"backbone": "ViT-L-14", "stride": 16}})
    with torch.device("meta"):  # the real shapes without allocating ViT-L/14's weights
        clip = build_clip("ViT-L-14", None, (256, 128))
        enc = ImageEncoder(clip.visual, num_cameras=2)
        head = ReIDHead(enc.width, enc.embed_dim, num_ids=7)
    assert clip.visual.conv1.stride == (14, 14) and clip.visual.grid_size == (18, 9)
    assert clip.visual.positional_embedding.shape == (1 + 18 * 9, 1024) and enc.camera_embed.shape == (3, 1024)
    assert (enc.width, enc.embed_dim) == (1024, 768)
    assert head.cls_f12.weight.shape == (7, 1024) and head.cls_fproj.weight.shape == (7, 768)
