"""Open-set and time-aware splits, and the optional photo dates they use (tables, EXIF)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest
from conftest import write_image
from PIL import Image
from test_adapters import make_reference_tree

from indivaid.data import DataError, SplitConfig, build_split, open_dataset, read_split, write_split
from indivaid.data.split import check_split


def parts(split, *names):
    return split.table.filter(pl.col("split").is_in(names))


def test_unknown_identities_have_only_queries_and_known_ones_split_as_in_the_closed_set(small_catalogue, tmp_path):
    closed = build_split(small_catalogue, SplitConfig(seed=1))
    open_ = build_split(small_catalogue, SplitConfig(seed=1, unknown_fraction=0.3))
    for stage, q, g in (("val", "val_query", "val_gallery"), ("test", "query", "gallery")):
        unknown = open_.unknown_identities(stage)
        ids = set(parts(closed, q, g)["identity"].to_list())
        assert set(parts(open_, q, g)["identity"].to_list()) == ids  # same identities in each stage
        assert len(unknown) == max(1, round(0.3 * len(ids))) and set(unknown) < ids
        assert parts(open_, g).filter(pl.col("identity").is_in(unknown)).height == 0
        assert int(open_.header[f"unknown_{stage}"]) == len(unknown)
    # known identities keep exactly their closed-set query/gallery assignment
    unknown = open_.unknown_identities("val") + open_.unknown_identities("test")
    known = lambda s: s.table.filter(~pl.col("identity").is_in(unknown)).select("image_id", "split").sort("image_id")  # noqa: E731
    assert known(open_).equals(known(closed))
    assert set(parts(open_, "train")["identity"]) == set(parts(closed, "train")["identity"])
    assert open_.open_set and not closed.open_set and open_.hash != closed.hash
    assert json.loads(open_.header["config"])["unknown_fraction"] == 0.3
    # recorded: the file round-trips, and an edit that contradicts the header is refused
    back = read_split(write_split(open_, tmp_path / "split.csv"))
    assert back.hash == open_.hash and back.unknown_identities("test") == open_.unknown_identities("test")
    moved = open_.table.with_columns(
        pl.when((pl.col("identity") == open_.unknown_identities("test")[0]) & (pl.col("split") == "query"))
        .then(pl.lit("gallery")).otherwise("split").alias("split"))
    with pytest.raises(DataError, match="records unknown_test"):
        check_split(type(open_)(moved, open_.header, open_.root))
    # seeded: the same seed picks the same unknown identities, another seed others
    again = build_split(small_catalogue, SplitConfig(seed=1, unknown_fraction=0.3))
    other = build_split(small_catalogue, SplitConfig(seed=2, unknown_fraction=0.3))
    assert again.hash == open_.hash and other.hash != open_.hash


def test_options_off_keep_the_split_file_and_hash(small_catalogue):
    plain = build_split(small_catalogue, SplitConfig(seed=1))
    off = build_split(small_catalogue, SplitConfig(seed=1, unknown_fraction=0.0, time_aware=False))
    assert off.hash == plain.hash and off.header == plain.header
    assert "unknown_fraction" not in plain.header["config"] and "time_aware" not in plain.header["config"]
    assert "date" not in plain.table.columns and not any(k.startswith("unknown_") for k in plain.header)


def test_leave_one_out_refuses_unknown_and_time_aware_with_the_fix(tmp_path: Path):
    make_reference_tree(tmp_path / "Stoat", ["camA", "camB"], True)
    cat = open_dataset("stoat", data_root=tmp_path)
    for cfg in (SplitConfig(unknown_fraction=0.2), SplitConfig(time_aware=True)):
        with pytest.raises(DataError, match="leave_one_out.*protocol 'none'"):
            build_split(cat, cfg)


def test_presplit_dataset_holds_out_unknown_test_identities(tmp_path: Path):
    root = make_reference_tree(tmp_path / "Lion", ["1", "2"], False)
    for pid in (4, 5, 6, 7):
        for k in range(2):
            write_image(root / "train" / f"{pid:04d}_1_{k}.jpg", seed=pid * 10 + k)
    split = build_split(open_dataset("lion", data_root=tmp_path), SplitConfig(val_fraction=0.4, unknown_fraction=0.5))
    n_val = split.part("val_query")["identity"].n_unique()
    assert n_val == 3 and len(split.unknown_identities("val")) == 2  # round(0.5 * 3)
    assert split.unknown_identities("test") in (["10"], ["11"])  # of the two given test identities
    assert split.part("gallery")["identity"].n_unique() == 1


def test_time_aware_split_puts_queries_after_gallery_images(small_catalogue, tmp_path: Path):
    assert small_catalogue.table["date"].null_count() == 0  # the synthetic table has dates
    split = build_split(small_catalogue, SplitConfig(seed=1, time_aware=True))
    assert int(split.header["time_ordered_val"]) + int(split.header["time_ordered_test"]) == \
        parts(split, "val_query", "query")["identity"].n_unique()
    for q, g in (("val_query", "val_gallery"), ("query", "gallery")):
        last_gallery = parts(split, g).group_by("identity").agg(pl.col("date").max().alias("g"))
        first_query = parts(split, q).group_by("identity").agg(pl.col("date").min().alias("q"))
        both = last_gallery.join(first_query, on="identity")
        assert both.height and (both["q"] >= both["g"]).all()
    assert split.hash != build_split(small_catalogue, SplitConfig(seed=1)).hash
    back = read_split(write_split(split, tmp_path / "split.csv"))
    assert back.hash == split.hash and back.table["date"].equals(split.table["date"])
    both = build_split(small_catalogue, SplitConfig(seed=1, time_aware=True, unknown_fraction=0.25))
    assert both.open_set and "date" in both.table.columns


def test_table_dates_parse_in_iso_and_exif_forms_and_a_bad_one_names_its_row(tmp_path: Path):
    rows = [("a", "2021-06-30"), ("a", "2021-07-01T10:00:00Z"), ("b", "2021:08:02 09:30:00"), ("b", ""), ("b", "NaT")]
    for i, (ident, _) in enumerate(rows):
        write_image(tmp_path / f"{i}.jpg", seed=i)
    pl.DataFrame({"identity": [r[0] for r in rows], "path": [f"{i}.jpg" for i in range(len(rows))],
                  "date": [r[1] for r in rows]}).write_csv(tmp_path / "metadata.csv")
    cat = open_dataset("table", tmp_path)
    assert cat.table.sort("path")["date"].to_list() == [
        datetime(2021, 6, 30), datetime(2021, 7, 1, 10), datetime(2021, 8, 2, 9, 30), None, None]
    pl.DataFrame({"identity": ["a"], "path": ["0.jpg"], "date": ["30/06/2021"]}).write_csv(tmp_path / "bad.csv")
    with pytest.raises(DataError, match=r"bad.csv row 2: date '30/06/2021' is not a date"):
        open_dataset("table", tmp_path / "bad.csv")


def test_folder_reads_exif_dates_only_when_asked(tmp_path: Path):
    def photo(path: Path, original: str | None = None, plain: str | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        exif = Image.Exif()
        if plain:
            exif[0x0132] = plain
        if original:
            exif.get_ifd(0x8769)[0x9003] = original
        Image.new("RGB", (24, 16), (90, 120, 40)).save(path, exif=exif)

    photo(tmp_path / "zebra1" / "a.jpg", original="2022:03:04 05:06:07", plain="2023:01:01 00:00:00")
    photo(tmp_path / "zebra1" / "b.jpg", plain="2022:03:05 08:00:00")
    photo(tmp_path / "zebra2" / "c.jpg")
    cat = open_dataset("folder", tmp_path, exif_dates=True).table.sort("image_id")
    assert cat["date"].to_list() == [datetime(2022, 3, 4, 5, 6, 7), datetime(2022, 3, 5, 8), None]
    assert cat["encounter"].to_list() == ["zebra1/2022-03-04", "zebra1/2022-03-05", None]  # a day is an encounter
    assert open_dataset("folder", tmp_path).table["date"].null_count() == 3
