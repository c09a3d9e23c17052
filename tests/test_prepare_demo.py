"""`python -m indivaid.data.prepare` round trip, and the demo's main job on a small dataset."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from conftest import SMALL

from indivaid.data import open_dataset, read_split
from indivaid.data.prepare import main as prepare_main


def test_prepare_writes_reference_layout_and_split_file(data_root: Path, small_catalogue, tmp_path: Path, capsys):
    opts = [f"-o{k}={v}" for k, v in SMALL.items()]
    rc = prepare_main(["synthetic", "--data-root", str(data_root), *opts, "--out", str(tmp_path), "--seed", "5"])
    assert rc == 0
    split_file = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert split_file == tmp_path / "synthetic" / "split-seed5.csv"
    split = read_split(split_file)
    assert split.table.height == len(small_catalogue) and split.header["seed"] == "5"
    assert all(Path(p).is_file() for p in split.table["path"].to_list())
    counts = split.table.group_by("split").len()
    # the reference layout reads back with the generic reference adapter: same images per folder
    cat = open_dataset("reference", path=tmp_path / "synthetic", protocol="market1501")
    folders = cat.table.group_by("given_split").len()
    n = dict(zip(counts["split"], counts["len"]))
    m = dict(zip(folders["given_split"], folders["len"]))
    assert m["train"] == n["train"] + n["val_query"] + n["val_gallery"]
    assert (m["query"], m["gallery"]) == (n["query"], n["gallery"])
    ids = pl.read_csv(tmp_path / "synthetic" / "identities.csv")
    assert ids.height == 30 and set(ids["identity"].to_list()) == set(small_catalogue.table["identity"].to_list())


def test_prepare_reports_errors_without_traceback(tmp_path: Path, capsys):
    assert prepare_main(["atrw", "--data-root", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_demo_prints_split_and_raw_pixel_baseline(data_root: Path, monkeypatch, tmp_path: Path):
    from rich.console import Console

    import indivaid.demo as demo

    monkeypatch.setenv("INDIVAID_CACHE", str(tmp_path / "cache"))
    console = Console(record=True, width=120)
    opts = [f"-o{k}={v}" for k, v in SMALL.items()]  # the demo's generator, made small
    quick = ["--set", "stage1.min_steps=0", "--set", "stage1.epochs=1", "--set", "stage2.epochs=1",
             "--set", "stage2.warmup_epochs=0"]  # a 1-epoch run has no room for the tiny preset's warm-up
    results = demo.main(["--data-root", str(data_root), *opts, "--methods", "clipreid", *quick,
                         "--workdir", str(tmp_path / "runs")], console=console)
    text = console.export_text()
    assert "val_gallery" in text and "split file:" in text
    for row in ("raw pixels / test", "untrained (tiny) / val", "clipreid / val", "clipreid / test"):
        assert row in results and row.split(" / ")[0] in text
    for m in results.values():
        assert 0 < m.mAP < 1 and m.num_valid_queries > 0
    assert len(list((tmp_path / "runs").glob("clipreid-*/model.pt"))) == 1
