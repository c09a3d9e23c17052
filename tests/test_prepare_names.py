"""Prepared datasets are named after their source folder or table, and never overwrite another."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from conftest import write_image

from indivaid.data import open_dataset, read_split
from indivaid.data.prepare import main as prepare_main


def identity_folders(root: Path, identities: int = 6, per_identity: int = 4, seed: int = 0) -> Path:
    """``root/<identity>/<n>.jpg``: the layout of the `folder` dataset."""
    for i in range(identities):
        for j in range(per_identity):
            write_image(root / f"id{i}" / f"{j}.jpg", seed=seed * 1000 + i * 10 + j)
    return root


def prepare(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = prepare_main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_two_folders_prepared_into_one_root_are_two_datasets(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "data"
    for name in ("dogs", "cats"):
        code, printed, err = prepare(["folder", "--path", str(identity_folders(tmp_path / "photos" / name)),
                                      "--out", str(out)], capsys)
        assert code == 0, err
        assert Path(printed.strip()) == out / name / "split-seed0.csv"
    assert sorted(p.name for p in out.iterdir()) == ["cats", "dogs"]
    for name in ("dogs", "cats"):
        split = read_split(out / name / "split-seed0.csv")
        assert split.dataset == name and split.table.height == 24
        assert all(Path(p).is_file() and Path(p).is_relative_to(out / name) for p in split.table["path"].to_list())
    # preparing the same source again (another seed) is allowed and keeps the name
    again = ["folder", "--path", str(tmp_path / "photos" / "dogs"), "--out", str(out), "--seed", "1"]
    code, _, err = prepare(again, capsys)
    assert code == 0 and (out / "dogs" / "split-seed1.csv").is_file(), err


def test_a_different_source_under_an_existing_name_is_refused_in_one_line(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "data"
    first = identity_folders(tmp_path / "a" / "dogs")
    second = identity_folders(tmp_path / "b" / "dogs", identities=5, seed=1)
    assert prepare(["folder", "--path", str(first), "--out", str(out)], capsys)[0] == 0
    before = sorted(p.relative_to(out) for p in (out / "dogs").rglob("*"))
    code, printed, err = prepare(["folder", "--path", str(second), "--out", str(out)], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and not printed and len(lines) == 1, err
    assert lines[0].startswith("error: ") and str(out / "dogs") in lines[0] and str(first) in lines[0]
    assert "-o name=NAME" in lines[0] and str(second) in lines[0]
    assert sorted(p.relative_to(out) for p in (out / "dogs").rglob("*")) == before  # untouched
    assert read_split(out / "dogs" / "split-seed0.csv").table["identity"].n_unique() == 6
    # the fix the message names: another name
    code, printed, err = prepare(["folder", "--path", str(second), "--out", str(out), "-o", "name=dogs-b"], capsys)
    assert code == 0 and Path(printed.strip()) == out / "dogs-b" / "split-seed0.csv", err
    # a folder that prepare did not write is not replaced either
    (out / "notes").mkdir()
    (out / "notes" / "readme.txt").write_text("mine")
    code, _, err = prepare(["folder", "--path", str(second), "--out", str(out), "-o", "name=notes"], capsys)
    assert code == 2 and "not written by prepare" in err and (out / "notes" / "readme.txt").read_text() == "mine"


def test_a_table_is_named_after_its_file_or_folder(tmp_path: Path):
    for i in range(4):
        write_image(tmp_path / "zoo" / f"{i}.jpg", seed=i)
    df = pl.DataFrame({"identity": ["a", "a", "b", "b"], "path": [f"{i}.jpg" for i in range(4)]})
    df.write_csv(tmp_path / "zoo" / "metadata.csv")
    df.write_csv(tmp_path / "zoo" / "giraffes-2021.csv")
    assert open_dataset("table", path=tmp_path / "zoo").name == "zoo"
    assert open_dataset("table", path=tmp_path / "zoo" / "giraffes-2021.csv").name == "giraffes-2021"
    assert open_dataset("table", path=tmp_path / "zoo", name="kenya").name == "kenya"
