"""Labelled image lists: the sample record, the catalogue table and its validation.

A catalogue is a polars table with one row per image (columns in :data:`COLUMNS`), plus the
dataset's metadata. Adapters produce catalogues; the split builder turns them into split files.
Everything downstream is vectorised over the table, so PolarBear's 138k images are no slower to
handle than a list of a hundred.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import polars as pl

from indivaid.utils.io import sha256_bytes

log = logging.getLogger(__name__)

#: Columns of every catalogue, in order. ``path`` is absolute; ``encounter`` groups images that
#: must stay on one side of a query/gallery split (a video, a visit); ``given_split`` is set for
#: datasets shipped pre-split (train/query/gallery) and null otherwise; ``date`` is when the photo
#: was taken, where known (a table's ``date`` column, EXIF when a folder asks for it).
COLUMNS: dict[str, type[pl.DataType] | pl.DataType] = {
    "image_id": pl.String,
    "path": pl.String,
    "identity": pl.String,
    "camera": pl.String,
    "encounter": pl.String,
    "given_split": pl.String,
    "bbox_x": pl.Float64,
    "bbox_y": pl.Float64,
    "bbox_w": pl.Float64,
    "bbox_h": pl.Float64,
    "date": pl.Datetime("us"),
}
#: Left out of :meth:`Catalogue.sha256`: dates were added after the first split files were
#: written, and only a time-aware split depends on them (it records them in its rows).
UNHASHED_COLUMNS = ("date",)
GIVEN_SPLITS = ("train", "query", "gallery")
MAX_LISTED = 10  # how many offending paths an error message names


class DataError(ValueError):
    """Bad input data; the message names the offending files and how to fix them."""


def list_paths(paths: Sequence[str], total: int | None = None) -> str:
    """First :data:`MAX_LISTED` paths, one per line, with a count of the rest."""
    total = len(paths) if total is None else total
    shown = "\n  ".join(str(p) for p in paths[:MAX_LISTED])
    more = f"\n  ... and {total - MAX_LISTED} more" if total > MAX_LISTED else ""
    return f"\n  {shown}{more}"


@dataclass(frozen=True)
class Sample:
    """One labelled image. ``bbox`` is (x, y, width, height) in pixels of the original image."""

    path: str
    identity: str
    camera: str = "0"
    encounter: str | None = None
    bbox: tuple[float, float, float, float] | None = None
    image_id: str | None = None
    given_split: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    date: datetime | None = None


@dataclass(frozen=True)
class Catalogue:
    """A dataset's images and metadata. ``table`` has exactly :data:`COLUMNS`."""

    name: str
    species: str
    root: Path
    table: pl.DataFrame
    default_protocol: str = "none"
    video: bool = False

    def __post_init__(self) -> None:
        if list(self.table.columns) != list(COLUMNS):
            raise ValueError(f"catalogue table must have columns {list(COLUMNS)}, got {self.table.columns}")

    @classmethod
    def from_samples(cls, samples: Iterable[Sample], **meta) -> Catalogue:
        rows = [_sample_row(s) for s in samples]
        return cls(table=make_table(rows), **meta)

    @classmethod
    def from_columns(cls, columns: Mapping[str, Sequence], **meta) -> Catalogue:
        """Build from column lists; missing optional columns are filled with nulls."""
        n = len(columns["path"])
        data = {c: columns.get(c, [None] * n) for c in COLUMNS}
        return cls(table=make_table(data), **meta)

    def __len__(self) -> int:
        return self.table.height

    @property
    def num_identities(self) -> int:
        return self.table["identity"].n_unique()

    def replace(self, **changes) -> Catalogue:
        return dataclasses.replace(self, **changes)

    def sha256(self) -> str:
        """Content hash of the labels (paths relative to ``root``), not of the pixels.

        Hashing metadata keeps it fast for 100k images and stable across machines where the data
        lives under different roots.
        """
        rel = self.table.drop(UNHASHED_COLUMNS).with_columns(
            pl.col("path").map_elements(self._relative, return_dtype=pl.String))
        text = rel.sort("image_id").write_csv()
        return sha256_bytes(f"{self.name}\n{self.species}\n{text}".encode())

    def _relative(self, path: str) -> str:
        try:
            return str(Path(path).relative_to(self.root))
        except ValueError:
            return path


def _sample_row(s: Sample) -> dict:
    x, y, w, h = s.bbox if s.bbox is not None else (None, None, None, None)
    return {
        "image_id": s.image_id or s.path,
        "path": s.path,
        "identity": s.identity,
        "camera": s.camera,
        "encounter": s.encounter,
        "given_split": s.given_split,
        "bbox_x": x,
        "bbox_y": y,
        "bbox_w": w,
        "bbox_h": h,
        "date": s.date,
    }


def make_table(data: Sequence[Mapping] | Mapping[str, Sequence]) -> pl.DataFrame:
    """A table with :data:`COLUMNS` and their dtypes; null image ids default to the path."""
    if isinstance(data, Mapping):
        table = pl.DataFrame({c: pl.Series(c, list(data[c]), dtype=COLUMNS[c], strict=False) for c in COLUMNS})
    else:
        table = pl.DataFrame(list(data), schema=COLUMNS, orient="row") if data else pl.DataFrame(schema=COLUMNS)
    table = table.with_columns(
        pl.coalesce("image_id", "path").alias("image_id"),
        pl.col("camera").fill_null("0"),
    )
    return table.select(list(COLUMNS))


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _check_image(path: str) -> str | None:
    """None if the file decodes as an image, else the reason."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.verify()
        return None
    except FileNotFoundError:
        return "missing"
    except Exception as e:  # PIL raises many types for corrupt data
        return f"unreadable ({type(e).__name__}: {e})"


def validate_catalogue(cat: Catalogue, *, decode: bool = True, skip_bad: bool = False, workers: int = 8) -> Catalogue:
    """Check the catalogue's rows and files; return it (without bad files when ``skip_bad``).

    Missing or corrupt images are an error naming the first files and the fix, unless
    ``skip_bad`` is set, in which case they are dropped, logged and counted.
    """
    t = cat.table
    if t.height == 0:
        raise DataError(f"dataset {cat.name!r} under {cat.root} has no images: check the path and layout")
    nulls = t.filter(pl.col("identity").is_null() | (pl.col("identity") == ""))
    if nulls.height:
        raise DataError(f"{nulls.height} images of {cat.name!r} have no identity label:{list_paths(nulls['path'].to_list())}")
    dup = t.filter(pl.col("image_id").is_duplicated())
    if dup.height:
        raise DataError(
            f"{cat.name!r}: image ids must be unique, {dup.height} rows share ids:"
            f"{list_paths(dup['image_id'].unique(maintain_order=True).to_list())}"
        )
    bad_split = t.filter(pl.col("given_split").is_not_null() & ~pl.col("given_split").is_in(GIVEN_SPLITS))
    if bad_split.height:
        raise DataError(f"{cat.name!r}: given_split must be one of {GIVEN_SPLITS}:{list_paths(bad_split['path'].to_list())}")
    paths = t["path"].to_list()
    if decode:
        with ThreadPoolExecutor(workers) as pool:
            reasons = list(pool.map(_check_image, paths, chunksize=64))
    else:
        reasons = [None if Path(p).is_file() else "missing" for p in paths]
    bad = [(p, r) for p, r in zip(paths, reasons) if r is not None]
    if not bad:
        return cat
    listing = list_paths([f"{p}: {r}" for p, r in bad])
    if not skip_bad:
        raise DataError(
            f"{len(bad)} of {len(paths)} images of {cat.name!r} are missing or unreadable:{listing}\n"
            "Fix or remove these files, or pass skip_bad=true (--skip-bad) to drop them (they are logged and counted)."
        )
    log.warning("skipping %d of %d bad images of %r:%s", len(bad), len(paths), cat.name, listing)
    keep = pl.Series([r is None for r in reasons])
    return cat.replace(table=t.filter(keep))
