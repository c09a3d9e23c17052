"""Model pieces: positional-embedding resize, encoders, prompts, fusion, losses, weight loading."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from indivaid.losses import batch_hard_triplet, pairwise_euclidean, supcon
from indivaid.models.backbone import WeightsError, adapt_visual, build_clip, output_grid, resize_pos_embed
from indivaid.models.encoders import ImageEncoder, TextEncoder
from indivaid.models.fusion import IdentityFusion, pad_descriptions
from indivaid.models.prompt import PromptLearner


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
    mean = IdentityFusion("mean", 16)(padded, mask)
    manual = torch.stack([desc[labels == c].mean(0) for c in range(3)])
    assert torch.allclose(mean, manual, atol=1e-6)
    attn = IdentityFusion("attention", 16, heads=4)
    assert torch.equal(attn(padded, mask), mean)
    # once trained away from zero, attention moves T away from the mean
    torch.nn.init.normal_(attn.attn.out_proj.weight)
    assert not torch.allclose(attn(padded, mask), mean)
    with pytest.raises(ValueError, match="must divide"):
        IdentityFusion("attention", 16, heads=5)


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
    with pytest.raises(WeightsError, match="neither a file nor an open_clip tag"):
        build_clip("ViT-B-16", "no-such-tag", (256, 128), 16)


def test_local_checkpoint_loads_strictly_and_mismatch_fails(tiny_clip, tmp_path: Path):
    path = tmp_path / "tiny_clip.pt"
    torch.save(tiny_clip.state_dict(), path)
    again = build_clip("tiny", str(path), (64, 32), 16)
    assert torch.equal(again.visual.conv1.weight, tiny_clip.visual.conv1.weight)
    torch.save({k: v for k, v in tiny_clip.state_dict().items() if not k.startswith("visual.ln_post")}, path)
    with pytest.raises(WeightsError, match="does not fit"):
        build_clip("tiny", str(path), (64, 32), 16)
