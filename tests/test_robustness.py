"""The corruption suite: each corruption destroys more as severity grows, draws are seeded, and
`python -m indivaid robustness` on a trained tiny checkpoint loses more with every severity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from indivaid.__main__ import main
from indivaid.eval.robustness import CORRUPTIONS, SEVERITIES, corrupt, generator_for, summary_metrics

#: where a trained model must lose more with every severity (the issue's "blur, noise and darkness")
MONOTONE = ("motion_blur", "defocus_blur", "gaussian_noise", "darkness")


def _images(n: int = 6, seed: int = 0) -> torch.Tensor:
    """Smooth random photos (uint8, 48 x 96): coloured blobs with texture, so blur has edges to remove."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 6, 12, generator=g)
    x = torch.nn.functional.interpolate(coarse, (48, 96), mode="bilinear", align_corners=False)
    x = x + 0.15 * torch.rand(n, 3, 48, 96, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=lambda c: c.name)
def test_every_corruption_is_seeded_keeps_the_shape_and_destroys_more_with_severity(corruption):
    x = _images()
    errors = []
    for sev in SEVERITIES:
        y = corrupt(x, corruption, sev, generator_for(0, corruption.name, sev, x.device))
        assert y.shape == x.shape and y.dtype == torch.uint8
        again = corrupt(x, corruption, sev, generator_for(0, corruption.name, sev, x.device))
        assert torch.equal(y, again)  # the same seed draws the same corruption
        errors.append(float((y.float() - x.float()).pow(2).mean()))
    assert 0 < errors[0] < errors[1] < errors[2], errors


def test_seeds_change_random_corruptions_only():
    x = _images()
    by_seed = {name: [corrupt(x, c, 2, generator_for(s, name, 2, x.device)) for s in (0, 1)]
               for c in CORRUPTIONS for name in [c.name]}
    assert not torch.equal(*by_seed["gaussian_noise"]) and not torch.equal(*by_seed["occlusion"])
    assert torch.equal(*by_seed["darkness"]) and torch.equal(*by_seed["jpeg"])  # nothing random in them


@pytest.mark.timeout(600)  # the session fixture open_runs trains once (conftest: about a minute)
def test_robustness_cli_table_plot_json_and_scores_fall_with_severity(open_runs, tmp_path: Path, capsys):
    ckpt = open_runs["clipreid"].checkpoint
    capsys.readouterr()
    assert main(["robustness", "--checkpoint", ckpt, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "robustness of clipreid on synthetic test" in out and "mean relative robustness" in out
    for c in CORRUPTIONS:
        assert c.name in out
    res = json.loads((tmp_path / "robustness.json").read_text())
    with Image.open(tmp_path / "robustness.png") as img:
        assert img.format == "PNG" and img.width > 600
    clean = res["clean"]
    assert clean["mAP"] == pytest.approx(open_runs["clipreid"].test["mAP"], abs=1e-6)  # same split, same scorer
    for name in MONOTONE:
        maps = [cell["mAP"] for cell in res["corruptions"][name]]
        assert maps[0] >= maps[1] >= maps[2], (name, maps)
        assert maps[2] <= clean["mAP"] - 0.03, (name, maps, clean)  # severe: clearly worse than clean
        assert res["corruptions"][name][2]["rel_mAP"] == pytest.approx(maps[2] / clean["mAP"])
    flat = summary_metrics(res)
    assert res["metrics"] == flat and 0 < flat["robust_rel_mAP"] < 1 and set(flat) >= {"robust_rel_rank1", "robust_motion_blur_rel_mAP"}
    # deterministic by seed: the same cells again; another seed draws other noise
    noise = res["corruptions"]["gaussian_noise"]
    for seed, same in ((0, True), (5, False)):
        again = tmp_path / f"seed{seed}"
        assert main(["robustness", "--checkpoint", ckpt, "--corruption", "gaussian_noise", "--seed", str(seed),
                     "--out", str(again)]) == 0
        cells = json.loads((again / "robustness.json").read_text())["corruptions"]["gaussian_noise"]
        assert (cells == noise) is same


def test_unknown_corruption_is_one_clear_error(capsys, tmp_path: Path):
    assert main(["robustness", "--checkpoint", str(tmp_path / "model.pt"), "--corruption", "fogg"]) == 2
    assert "--corruption fogg: unknown; choose from darkness" in capsys.readouterr().err
