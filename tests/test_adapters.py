"""Every adapter on generated fixture trees in its real file-name format."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import write_image
from PIL import Image

from indivaid.data import DATASETS, PROTOCOLS, DataError, make_adapter, open_dataset, validate_catalogue
from indivaid.data.catalogue import GIVEN_SPLITS

PAPER = {  # name: (camera field examples, leave-one-out)
    "ATRW": (["1", "2"], False),
    "FriesianCattle2017": (["1", "1"], False),
    "IPanda50": (["0", "0"], False),
    "Lion": (["1", "1"], False),
    "MPDD": (["front", "side"], False),
    "Nyala": (["1", "1"], False),
    "PolarBear": (["17", "18"], False),
    "SeaStar": (["1", "1"], False),
    "Stoat": (["trailA", "trailB"], True),
}


def make_reference_tree(root: Path, cams: list[str], loo: bool) -> Path:
    """train: ids 1-3; query/gallery: ids 10-11 (2 images each), names <pid>_<cam>_<n>[_x].jpg."""
    n = 0
    for split, pids in [("train", [1, 2, 3]), ("query", [10, 11])] + ([] if loo else [("gallery", [10, 11])]):
        for pid in pids:
            for k, cam in enumerate(cams):
                n += 1
                write_image(root / split / f"{pid:04d}_{cam}_{k}{'_extra' if pid == 2 else ''}.jpg", seed=n)
    return root


def test_all_nine_paper_datasets_are_registered():
    for name in PAPER:
        assert name.lower() in DATASETS
        info = make_adapter(name).info
        assert info.species and info.citation and info.expected
    assert make_adapter("Stoat").info.default_protocol == "leave_one_out"
    assert make_adapter("PolarBear").info.video


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_adapter_parses_reference_layout(name: str, tmp_path: Path, caplog):
    cams, loo = PAPER[name]
    make_reference_tree(tmp_path / name, cams, loo)
    with caplog.at_level(logging.WARNING):
        cat = open_dataset(name, data_root=tmp_path)
    cat = validate_catalogue(cat)
    t = cat.table
    assert cat.species == make_adapter(name).info.species
    assert set(t["given_split"].unique()) == ({"train", "query"} if loo else {"train", "query", "gallery"})
    assert sorted(t.filter(pl.col("given_split") == "train")["identity"].unique()) == ["1", "2", "3"]
    assert set(t["camera"].unique()) == set(cams)
    if make_adapter(name).info.video:  # the video id becomes the encounter
        assert t["encounter"].to_list() == t["camera"].to_list()
    else:
        assert t["encounter"].is_null().all()
    assert "published split has" in caplog.text  # tiny tree != published counts: warned, not failed


def test_reference_layout_rejects_bad_names_and_missing_folders(tmp_path: Path):
    root = make_reference_tree(tmp_path / "ATRW", ["1", "2"], False)
    write_image(root / "train" / "tiger_one.jpg")
    with pytest.raises(DataError, match=r"(?s)1 file names do not match.*tiger_one\.jpg"):
        open_dataset("atrw", data_root=tmp_path)
    with pytest.raises(DataError, match="lacks the folder"):
        open_dataset("lion", path=tmp_path / "ATRW" / "train")
    with pytest.raises(DataError, match="does not exist"):
        open_dataset("nyala", data_root=tmp_path)
    with pytest.raises(KeyError, match="did you mean 'nyala'"):
        open_dataset("nyla", data_root=tmp_path)


def test_folder_adapter_with_encounter_subfolders(tmp_path: Path):
    for ident in ("zebra_a", "zebra_b"):
        write_image(tmp_path / ident / "visit1" / "a.jpg")
        write_image(tmp_path / ident / "visit2" / "b.png")
        write_image(tmp_path / ident / "c.jpg")
    cat = open_dataset("folder", path=tmp_path, species="zebra")
    assert len(cat) == 6 and cat.species == "zebra" and cat.num_identities == 2
    enc = dict(zip(cat.table["image_id"], cat.table["encounter"]))
    assert enc["zebra_a/visit1/a.jpg"] == "zebra_a/visit1" and enc["zebra_a/c.jpg"] is None
    with pytest.raises(DataError, match="has no option 'specie'.*did you mean 'species'"):
        open_dataset("folder", path=tmp_path, specie="zebra")


def test_table_adapter_wildlife_convention_with_bbox_and_dates(tmp_path: Path):
    img = np.zeros((40, 60, 3), np.uint8)
    img[10:30, 20:50] = (255, 0, 0)  # a red box: the bbox crop must contain only red
    Image.fromarray(img).save(tmp_path / "a.png")
    write_image(tmp_path / "imgs" / "b.jpg")
    pl.DataFrame({
        "image_id": ["1", "2"], "identity": ["Kima", "Lua"], "path": ["a.png", "imgs/b.jpg"],
        "date": ["2020-01-01", None], "orientation": ["left", "right"], "bbox": ["[20, 10, 30, 20]", None],
        "species": ["giraffe", "giraffe"],
    }).write_csv(tmp_path / "metadata.csv")
    cat = open_dataset("table", path=tmp_path)
    row = cat.table.row(0, named=True)
    assert cat.species == "giraffe" and row["camera"] == "left" and row["encounter"] == "Kima/2020-01-01"
    assert (row["bbox_x"], row["bbox_y"], row["bbox_w"], row["bbox_h"]) == (20, 10, 30, 20)
    from indivaid.data.imagecache import ImageSpec, load_image

    crop = load_image(row["path"], (row["bbox_x"], row["bbox_y"], row["bbox_w"], row["bbox_h"]), ImageSpec(16, 8))
    assert crop.shape == (3, 16, 8) and crop[0].min() > 200 and crop[1:].max() < 60
    # the same table as parquet, and a broken bbox named by file and row
    df = pl.read_csv(tmp_path / "metadata.csv").with_columns(pl.lit("[1, 2]").alias("bbox"))
    df.write_parquet(tmp_path / "meta.parquet")
    with pytest.raises(DataError, match=r"meta.parquet row 2: bbox '\[1, 2\]'"):
        open_dataset("table", path=tmp_path / "meta.parquet")


def test_validation_names_missing_and_corrupt_files_and_skip_bad(tmp_path: Path, caplog):
    for i in range(3):
        write_image(tmp_path / "a" / f"{i}.jpg")
    (tmp_path / "a" / "1.jpg").write_bytes(b"not a jpeg")
    cat = open_dataset("folder", path=tmp_path)
    (tmp_path / "a" / "2.jpg").unlink()
    with pytest.raises(DataError, match=r"(?s)2 of 3 images.*1\.jpg: unreadable.*2\.jpg: missing.*skip_bad"):
        validate_catalogue(cat)
    with caplog.at_level(logging.WARNING):
        kept = validate_catalogue(cat, skip_bad=True)
    assert len(kept) == 1 and "skipping 2 of 3 bad images" in caplog.text


def test_synthetic_is_registered_like_any_other(small_catalogue):
    cat = small_catalogue
    assert cat.name == "synthetic" and cat.default_protocol == "market1501" and cat.num_identities == 30
    assert cat.table["camera"].n_unique() >= 2 and cat.table["encounter"].null_count() == 0
    with pytest.raises(DataError, match="unknown option 'identites'.*did you mean 'identities'"):
        make_adapter("synthetic", identites=3)


def _paper(name: str) -> Callable[[Path, Path], dict]:
    """A fixture tree for a paper dataset in the reference layout, in its real camera-field format."""

    def build(tmp: Path, _data_root: Path) -> dict:
        cams, loo = PAPER[make_adapter(name).info.name]
        make_reference_tree(tmp / make_adapter(name).info.name, cams, loo)
        return {"data_root": tmp}

    return build


def _reference(tmp: Path, _data_root: Path) -> dict:
    make_reference_tree(tmp / "zebras", ["1", "2"], False)
    return {"path": tmp / "zebras", "species": "zebra", "name": "zebras"}


def _folder(tmp: Path, _data_root: Path) -> dict:
    for ident in ("kima", "lua"):
        write_image(tmp / "photos" / ident / "visit1" / "a.jpg", seed=len(ident))
        write_image(tmp / "photos" / ident / "b.png", seed=7)
    return {"path": tmp / "photos"}


def _table(tmp: Path, _data_root: Path) -> dict:
    for i in range(4):
        write_image(tmp / "imgs" / f"{i}.jpg", seed=i)
    pl.DataFrame({"identity": ["a", "a", "b", "b"], "path": [f"imgs/{i}.jpg" for i in range(4)],
                  "camera": ["1", "2", "1", "2"]}).write_csv(tmp / "metadata.csv")
    return {"path": tmp}


def _synthetic(_tmp: Path, data_root: Path) -> dict:
    from conftest import SMALL

    return {"data_root": data_root, **SMALL}  # the session's generated set (made once, reused)


#: How to lay out a small instance of each registered dataset: a new adapter needs an entry here.
FIXTURES: dict[str, Callable[[Path, Path], dict]] = {
    **{name.lower(): _paper(name) for name in PAPER},
    "reference": _reference, "folder": _folder, "table": _table, "synthetic": _synthetic,
}


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_registered_adapter_yields_a_valid_stable_catalogue(name: str, tmp_path: Path, data_root: Path):
    if name not in FIXTURES:
        pytest.fail(f"dataset {name!r} is registered but has no fixture: add a builder to FIXTURES in {__file__}")
    kwargs = FIXTURES[name](tmp_path, data_root)
    cat = validate_catalogue(open_dataset(name, **kwargs))  # every file exists and decodes
    t = cat.table
    assert len(cat) > 0 and t["image_id"].n_unique() == len(cat) and cat.num_identities >= 2
    assert t["identity"].null_count() == 0 and (t["identity"].str.len_chars() > 0).all()
    assert all(Path(p).is_absolute() for p in t["path"].to_list())
    assert set(t["given_split"].drop_nulls().to_list()) <= set(GIVEN_SPLITS)
    assert cat.species and cat.default_protocol in PROTOCOLS and cat.species == make_adapter(name, **{
        k: v for k, v in kwargs.items() if k not in ("path", "data_root")}).info.species
    assert open_dataset(name, **kwargs).sha256() == cat.sha256()  # the split hash's input is stable
