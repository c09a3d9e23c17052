"""Split builder: identity-disjoint, seeded, encounters kept together, recorded and hashed."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from conftest import write_image
from test_adapters import make_reference_tree

from indivaid.data import DataError, SplitConfig, build_split, open_dataset, read_split, write_split
from indivaid.data.split import SPLITS, check_split


def ids(split, *parts):
    return set(split.table.filter(pl.col("split").is_in(parts))["identity"].to_list())


def test_split_is_identity_disjoint_and_keeps_encounters_together(small_catalogue):
    split = build_split(small_catalogue, SplitConfig(seed=1))
    train, val, test = ids(split, "train"), ids(split, "val_query", "val_gallery"), ids(split, "query", "gallery")
    assert train and val and test and not (train & val) and not (train & test) and not (val & test)
    assert len(train | val | test) == 30 and len(split.table) == len(small_catalogue)
    assert ids(split, "val_query") == ids(split, "val_gallery") and ids(split, "query") == ids(split, "gallery")
    for qpart, gpart in (("val_query", "val_gallery"), ("query", "gallery")):
        q_enc = set(split.part(qpart)["encounter"].to_list())
        assert q_enc and not q_enc & set(split.part(gpart)["encounter"].to_list())
    assert split.protocol == "market1501" and split.header["catalogue_sha256"] == small_catalogue.sha256()


def test_split_is_deterministic_by_seed_and_hash_tracks_content(small_catalogue, tmp_path: Path):
    a, b = build_split(small_catalogue, SplitConfig(seed=1)), build_split(small_catalogue, SplitConfig(seed=1))
    c = build_split(small_catalogue, SplitConfig(seed=2))
    assert a.table.equals(b.table) and a.hash == b.hash
    assert a.hash != c.hash and not a.table["split"].equals(c.table["split"])
    path = write_split(a, tmp_path / "split.csv")
    text = path.read_text()
    assert text.startswith("# format: indivaid-split/1\n") and "# seed: 1\n" in text and "# catalogue_sha256: " in text
    back = read_split(path)
    assert back.hash == a.hash and back.table.select(a.table.columns).equals(a.table)
    moved = read_split(path, root=tmp_path / "elsewhere")  # data moved: same content, same hash
    assert moved.hash == a.hash and moved.table["path"][0].startswith(str(tmp_path / "elsewhere"))


def test_presplit_dataset_keeps_test_and_carves_validation_from_train(tmp_path: Path):
    root = make_reference_tree(tmp_path / "Lion", ["1", "2"], False)
    for pid in (4, 5, 6, 7):  # more training identities so validation can be carved out
        for k in range(2):
            write_image(root / "train" / f"{pid:04d}_1_{k}.jpg", seed=pid * 10 + k)
    cat = open_dataset("lion", data_root=tmp_path)
    split = build_split(cat, SplitConfig(seed=0, val_fraction=0.3))
    given = dict(zip(cat.table["image_id"], cat.table["given_split"]))
    for im, part in zip(split.table["image_id"], split.table["split"]):
        assert (given[im] == "train") == (part in ("train", "val_query", "val_gallery"))
        if given[im] != "train":
            assert given[im] == part
    assert len(ids(split, "val_query")) == 2 and split.protocol == "none"


def test_leave_one_out_split_for_stoat(tmp_path: Path):
    make_reference_tree(tmp_path / "Stoat", ["camA", "camB"], True)
    for pid in (4, 5):
        for k in range(2):
            write_image(tmp_path / "Stoat" / "train" / f"{pid}_camA_{k}.jpg", seed=pid + k)
    split = build_split(open_dataset("stoat", data_root=tmp_path), SplitConfig(val_fraction=0.4))
    assert split.leave_one_out and split.part("gallery").height == 0 and split.part("val_gallery").height == 0
    q, g = split.query_gallery("test")
    assert q.equals(g) and q.height == 4
    assert split.part("val_query").height > 0


def test_check_split_rejects_overlap_orphans_and_protocol_without_positives(small_catalogue):
    split = build_split(small_catalogue, SplitConfig(seed=0))
    one_test_id = split.part("query")["identity"][0]
    leaked = split.table.with_columns(
        pl.when((pl.col("identity") == one_test_id) & (pl.col("split") == "gallery")).then(pl.lit("train"))
        .otherwise("split").alias("split"))
    with pytest.raises(DataError, match="in both train and test"):
        check_split(type(split)(leaked, split.header, split.root))
    orphan = split.table.filter(~((pl.col("identity") == one_test_id) & (pl.col("split") == "gallery")))
    with pytest.raises(DataError, match="no image of their identity in the gallery"):
        check_split(type(split)(orphan, split.header, split.root))
    one_cam = split.table.with_columns(pl.lit("0").alias("camera"))
    with pytest.raises(DataError, match="leaves no query with a true match"):
        check_split(type(split)(one_cam, split.header, split.root))


def test_split_errors_are_clear(small_catalogue, tmp_path: Path):
    with pytest.raises(ValueError, match="must leave identities for training"):
        SplitConfig(val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="did you mean 'market1501'"):
        SplitConfig(protocol="market")
    with pytest.raises(DataError, match="not found"):
        read_split(tmp_path / "nope.csv")
    (tmp_path / "bad.csv").write_text("image_id,path\n")
    with pytest.raises(DataError, match="not a split file"):
        read_split(tmp_path / "bad.csv")
    assert set(build_split(small_catalogue).table["split"].unique()) == set(SPLITS)
