"""Bring-your-own-data adapters: a folder per identity, or a wildlife-datasets style table.

``folder``: ``<root>/<identity>/[<encounter>/]<image>``; ``exif_dates: true`` reads each photo's
EXIF date (and, without an encounter folder, makes the calendar day the encounter, so that a burst
of frames never straddles query and gallery).
``table``: CSV or Parquet with ``image_id, identity, path`` and optionally ``date``, ``video``,
``encounter``, ``camera`` (or ``orientation``), ``bbox`` ("[x, y, w, h]" or a list), ``split``
(train/query/gallery, for pre-split data) and ``species`` -- the metadata convention of the
wildlife-datasets package, so its ~40 datasets load through one adapter.
"""

from __future__ import annotations

import ast
import logging
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import polars as pl

from indivaid.data.adapters.base import DATASETS, DatasetAdapter, DatasetInfo, find_images, source_name
from indivaid.data.catalogue import Catalogue, DataError, list_paths

log = logging.getLogger(__name__)


class FolderAdapter(DatasetAdapter):
    """One sub-folder per identity; a second folder level, when present, is the encounter.
    Named after its folder unless ``name`` is given."""

    def __init__(self, *, name: str | None = None, species: str = "animal", protocol: str = "none",
                 exif_dates: bool = False) -> None:
        self.info = DatasetInfo(name or "folder", species, default_protocol=protocol)
        self._named = name is not None
        self.exif_dates = exif_dates

    def default_path(self, data_root: Path, *, create: bool = True) -> Path:
        raise DataError("the `folder` dataset needs an explicit path: <root>/<identity>/<images>")

    def load(self, path: Path) -> Catalogue:
        if not self._named:
            self.info = replace(self.info, name=source_name(path))
        ids = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not ids:
            raise DataError(f"{path}: no identity sub-folders found; expected {path}/<identity>/<image files>")
        cols: dict[str, list] = {"image_id": [], "path": [], "identity": [], "encounter": [], "date": []}
        for folder in ids:
            for file in find_images(folder):
                rel = file.relative_to(folder)
                date = exif_date(file) if self.exif_dates else None
                cols["image_id"].append(str(file.relative_to(path)))
                cols["path"].append(str(file))
                cols["identity"].append(folder.name)
                day = f"{folder.name}/{date.date().isoformat()}" if date is not None else None
                cols["encounter"].append(f"{folder.name}/{rel.parts[0]}" if len(rel.parts) > 1 else day)
                cols["date"].append(date)
        if self.exif_dates:
            undated = sum(d is None for d in cols["date"])
            log.info("%s: EXIF dates read for %d of %d photos", path, len(cols["date"]) - undated, len(cols["date"]))
        return self.catalogue(path, cols)


#: EXIF tags holding when a photo was taken: DateTimeOriginal (Exif IFD), then DateTime (IFD0).
_EXIF_IFD, _DATETIME_ORIGINAL, _DATETIME = 0x8769, 0x9003, 0x0132


def exif_date(file: Path) -> datetime | None:
    """When the photo was taken, from its EXIF (None when absent or unreadable: dates are optional)."""
    from PIL import Image

    try:
        with Image.open(file) as img:
            exif = img.getexif()
            raw = exif.get_ifd(_EXIF_IFD).get(_DATETIME_ORIGINAL) or exif.get(_DATETIME)
    except (OSError, ValueError, SyntaxError):
        return None
    if not raw:
        return None
    try:
        return datetime.strptime(str(raw).strip("\x00 "), "%Y:%m:%d %H:%M:%S")
    except ValueError:
        log.warning("%s: EXIF date %r is not YYYY:MM:DD HH:MM:SS; ignored", file, raw)
        return None


_NO_DATE = ("", "nan", "nat", "none", "null")


def parse_date(value: object, where: str) -> datetime | None:
    """A table's ``date`` cell as a datetime: ISO 8601 (a day or a time), or EXIF's ``YYYY:MM:DD HH:MM:SS``."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.replace(tzinfo=None)
    text = str(value).strip()
    if text.lower() in _NO_DATE:
        return None
    for attempt in (lambda t: datetime.fromisoformat(t.replace("Z", "+00:00")),
                    lambda t: datetime.strptime(t, "%Y:%m:%d %H:%M:%S")):
        try:
            return attempt(text).replace(tzinfo=None)
        except ValueError:
            continue
    raise DataError(f"{where}: date {text!r} is not a date; use ISO 8601 (2021-06-30 or 2021-06-30T14:05:00) "
                    "or leave the cell empty")


def _parse_bbox(value: object, where: str) -> tuple[float, float, float, float] | None:
    if value is None:
        return None
    raw = value
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise DataError(f"{where}: bbox {value!r} is not a list [x, y, width, height]") from None
    try:
        x, y, w, h = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise DataError(f"{where}: bbox {raw!r} is not a list [x, y, width, height]") from None
    if w <= 0 or h <= 0:
        raise DataError(f"{where}: bbox {value!r} has a non-positive width or height")
    return x, y, w, h


def read_table(file: Path) -> pl.DataFrame:
    if file.suffix.lower() == ".parquet":
        return pl.read_parquet(file)
    if file.suffix.lower() in (".csv", ".tsv", ".txt"):
        return pl.read_csv(file, separator="\t" if file.suffix.lower() == ".tsv" else ",", infer_schema_length=0)
    raise DataError(f"{file}: a table must be .csv, .tsv or .parquet")


class TableAdapter(DatasetAdapter):
    """A metadata table; image paths are relative to ``images`` (default: the table's folder).
    Named after the path it is loaded from (the table file, or the folder holding it) unless
    ``name`` is given."""

    def __init__(self, *, table: str = "metadata.csv", images: str | None = None, name: str | None = None,
                 species: str | None = None, protocol: str = "none", video: bool = False) -> None:
        self.table_name, self.images = table, images
        self.info = DatasetInfo(name or "table", species or "animal", default_protocol=protocol, video=video)
        self._species_given = species is not None
        self._named = name is not None

    def default_path(self, data_root: Path, *, create: bool = True) -> Path:
        raise DataError("the `table` dataset needs an explicit path (the folder holding the table or the table file)")

    def load(self, path: Path) -> Catalogue:
        if not self._named:
            self.info = replace(self.info, name=source_name(path))
        file = path if path.is_file() else path / self.table_name
        if not file.is_file():
            raise DataError(f"{file}: metadata table not found (set `table:` to its file name)")
        base = Path(self.images).expanduser() if self.images else file.parent
        return self.from_frame(read_table(file), base, str(file))

    def from_frame(self, df: pl.DataFrame, base: Path, file: str) -> Catalogue:
        """Catalogue from an in-memory table (``file`` names it in errors); paths relative to ``base``."""
        missing = [c for c in ("identity", "path") if c not in df.columns]
        if missing:
            raise DataError(f"{file}: missing column(s) {missing}; required: identity, path (image_id optional)")
        rows = df.with_row_index("_row").to_dicts()
        cols: dict[str, list] = {k: [] for k in ("image_id", "path", "identity", "camera", "encounter", "given_split",
                                                 "bbox_x", "bbox_y", "bbox_w", "bbox_h", "date")}
        for r in rows:
            where = f"{file} row {r['_row'] + 2}"
            if r["identity"] in (None, ""):
                raise DataError(f"{where}: empty identity")
            p = Path(str(r["path"]))
            cols["path"].append(str(p if p.is_absolute() else (base / p).resolve()))
            cols["image_id"].append(str(r.get("image_id") or r["path"]))
            cols["identity"].append(str(r["identity"]))
            cam = r.get("camera", r.get("orientation"))
            cols["camera"].append(str(cam) if cam not in (None, "") else "0")
            enc = r.get("encounter") or r.get("video") or r.get("date")
            cols["encounter"].append(f"{r['identity']}/{enc}" if enc not in (None, "") else None)
            cols["given_split"].append(r.get("split") or None)
            cols["date"].append(parse_date(r.get("date"), where))
            box = _parse_bbox(r.get("bbox"), where)
            for k, v in zip(("bbox_x", "bbox_y", "bbox_w", "bbox_h"), box or (None,) * 4):
                cols[k].append(v)
        if not self._species_given and "species" in df.columns:
            species = df["species"].drop_nulls().unique().to_list()
            if len(species) == 1:
                self.info = DatasetInfo(self.info.name, str(species[0]), default_protocol=self.info.default_protocol,
                                        video=self.info.video)
            elif len(species) > 1:
                log.warning("%s: several species %s; using the prompt noun %r (set `species:`)", file,
                            species[:5], self.info.species)
        unknown = sorted({s for s in cols["given_split"] if s is not None} - {"train", "query", "gallery"})
        if unknown:
            raise DataError(f"{file}: column split has values {unknown}; allowed: train, query, gallery")
        if any(s is None for s in cols["given_split"]) and any(s is not None for s in cols["given_split"]):
            missing_rows = [p for p, s in zip(cols["path"], cols["given_split"]) if s is None]
            raise DataError(f"{file}: the split column is empty for some rows:{list_paths(missing_rows)}")
        return self.catalogue(base.resolve(), cols)


DATASETS.register("folder", FolderAdapter)
DATASETS.register("table", TableAdapter)
