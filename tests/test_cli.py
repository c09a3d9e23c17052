"""`python -m indivaid train | evaluate | embed | match` on a quick tiny run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
from conftest import SMALL
from PIL import Image

from indivaid.__main__ import main


@pytest.fixture(scope="module")
def trained(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("cli")
    sets = ["--set", f"data.data_root={data_root}", "--set", f"data.cache_dir={work / 'cache'}",
            "--set", "stage1.min_steps=0", "--set", "stage1.epochs=1", "--set", "stage2.epochs=2",
            "--set", "stage2.warmup_epochs=0",  # the tiny preset's 2-epoch warm-up would swallow a 2-epoch run
            "--set", "stage1.batch_p=8", "--set", "stage2.batch_p=8", "--set", "method=clipreid"]
    sets += [a for k, v in SMALL.items() for a in ("--set", f"data.options.{k}={v}")]
    assert main(["train", "--preset", "tiny", *sets, "--workdir", str(work / "run")]) == 0
    return work / "run" / "model.pt"


def test_train_writes_checkpoint_and_evaluate_reads_it(trained: Path, capsys):
    assert trained.is_file()
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(trained), "--split", "test"]) == 0
    out = json.loads(capsys.readouterr().out)
    run = json.loads((trained.parent / "result.json").read_text())
    assert out["split_hash"] == run["split_hash"] and out["protocol"] == "market1501"
    assert out["mAP"] == pytest.approx(run["test"]["mAP"], abs=1e-4)  # same weights, same split, same number


def test_embed_then_match_ranks_known_individuals(trained: Path, tmp_path: Path, data_root: Path, capsys):
    src = next(data_root.glob("Synthetic-*/images"))
    ids = sorted(p for p in src.iterdir() if p.is_dir())[:4]
    gallery, queries = tmp_path / "gallery", tmp_path / "new"
    for d in ids:
        files = sorted(d.glob("*.jpg"))
        (gallery / d.name).mkdir(parents=True)
        (queries / d.name).mkdir(parents=True)
        for f in files[1:]:
            shutil.copy(f, gallery / d.name / f.name)
        shutil.copy(files[0], queries / d.name / files[0].name)
    parquet = tmp_path / "gallery.parquet"
    assert main(["embed", "--checkpoint", str(trained), "--images", str(gallery), "--out", str(parquet)]) == 0
    table = pl.read_parquet(parquet)
    assert set(table["identity"]) == {d.name for d in ids} and len(table["embedding"][0]) == 64 + 32
    grid = tmp_path / "grid.png"
    capsys.readouterr()
    assert main(["match", "--checkpoint", str(trained), "--gallery", str(parquet), "--images", str(queries),
                 "--top-k", "3", "--grid", str(grid)]) == 0
    out = capsys.readouterr().out
    assert "top-3 matches" in out and ids[0].name in out
    with Image.open(grid) as img:
        assert img.format == "PNG" and img.width >= 300 and img.height >= 4 * 100


def test_bad_config_is_one_clear_error(capsys, tmp_path: Path):
    assert main(["train", "--preset", "tiny", "--set", "stage2.lrr=1", "--workdir", str(tmp_path)]) == 2
    assert "stage2.lrr: unknown key (did you mean 'lr'?)" in capsys.readouterr().err
    assert main(["train", "--preset", "tinyy", "--workdir", str(tmp_path)]) == 2
    assert "did you mean 'tiny'" in capsys.readouterr().err
