"""Seeded, recorded, identity-disjoint splits.

Every image gets one of :data:`SPLITS`. Validation identities are held out of training and used
for model selection; test identities are only for final scores. An encounter (video, visit) never
straddles query and gallery. The split file is a CSV with ``# key: value`` header lines; its hash
(:attr:`Split.hash`) goes into every cache key and result row downstream.

Open-set splits (``unknown_fraction``) hold out some validation and test identities as unknown:
all their images are queries and none is in the gallery, so the right answer for them is "a new
individual". Time-aware splits (``time_aware``) put each identity's latest encounters in the query
part where dates exist, as a catalogue grows: photos of a burst or video never face each other.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl

from indivaid.config import to_dict
from indivaid.data.adapters.base import PROTOCOLS
from indivaid.data.catalogue import COLUMNS, Catalogue, DataError, list_paths
from indivaid.registry import did_you_mean
from indivaid.utils.io import atomic_write_text, sha256_bytes

log = logging.getLogger(__name__)

SPLITS = ("train", "val_query", "val_gallery", "query", "gallery")
BUILDER_VERSION = 1
FORMAT = "indivaid-split/1"
Stage = Literal["val", "test"]


@dataclass(frozen=True)
class SplitConfig:
    """How to split a catalogue. Fractions are of identities; ``query_fraction`` of encounters.

    ``unknown_fraction``: of the validation and of the test identities, held out as unknown (query
    images only). ``time_aware``: an identity whose encounters all have dates puts its latest ones
    in the query part. Both are left out of the recorded config while off, so existing split
    files keep their hash."""

    seed: int = 0
    val_fraction: float = field(default=0.15, metadata={"ge": 0.0, "lt": 1.0})
    test_fraction: float = field(default=0.2, metadata={"ge": 0.0, "lt": 1.0})
    query_fraction: float = field(default=0.5, metadata={"gt": 0.0, "lt": 1.0})
    protocol: str | None = None  # None: the dataset's default
    unknown_fraction: float = field(default=0.0, metadata={"ge": 0.0, "lt": 1.0, "omit_default": True})
    time_aware: bool = field(default=False, metadata={"omit_default": True})

    def __post_init__(self) -> None:
        if self.protocol is not None and self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol {self.protocol!r} is not one of {PROTOCOLS}{did_you_mean(self.protocol, PROTOCOLS)}")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave identities for training")
        if not 0.0 <= self.unknown_fraction < 1.0:
            raise ValueError(f"unknown_fraction must be in [0, 1) (a fraction of the validation and test identities), "
                             f"got {self.unknown_fraction}")


@dataclass(frozen=True)
class Split:
    """A catalogue with a ``split`` column, plus the header that says how it was made."""

    table: pl.DataFrame
    header: dict[str, str]
    root: Path

    @property
    def protocol(self) -> str:
        return self.header["protocol"]

    @property
    def species(self) -> str:
        return self.header["species"]

    @property
    def dataset(self) -> str:
        return self.header["dataset"]

    @property
    def hash(self) -> str:
        """Content hash (header without the machine-specific root, plus rows), 16 hex digits."""
        return sha256_bytes(_serialise(self, with_root=False).encode())[:16]

    @property
    def leave_one_out(self) -> bool:
        return self.protocol == "leave_one_out"

    def part(self, name: str) -> pl.DataFrame:
        if name not in SPLITS:
            raise KeyError(f"unknown split part {name!r}; parts: {SPLITS}")
        return self.table.filter(pl.col("split") == name)

    def query_gallery(self, stage: Stage) -> tuple[pl.DataFrame, pl.DataFrame]:
        """(query, gallery) of the validation or test stage; leave-one-out: gallery = query."""
        q = self.part("val_query" if stage == "val" else "query")
        g = q if self.leave_one_out else self.part("val_gallery" if stage == "val" else "gallery")
        return q, g

    def camera_codes(self) -> dict[str, int]:
        """One camera numbering across all parts (the public MPDD loader numbered per part)."""
        return {c: i for i, c in enumerate(sorted(self.table["camera"].unique().to_list()))}

    def train_identities(self) -> list[str]:
        return sorted(self.part("train")["identity"].unique().to_list())

    @property
    def open_set(self) -> bool:
        """Whether unknown identities were held out (recorded in the header)."""
        return any(int(self.header.get(f"unknown_{s}", 0)) > 0 for s in ("val", "test"))

    def unknown_identities(self, stage: Stage) -> list[str]:
        """Query identities with no gallery image in this stage (leave-one-out: single-image ones)."""
        q, g = self.query_gallery(stage)
        if self.leave_one_out:
            return sorted(q.group_by("identity").len().filter(pl.col("len") < 2)["identity"].to_list())
        return sorted(set(q["identity"].unique().to_list()) - set(g["identity"].unique().to_list()))


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def _groups(table: pl.DataFrame) -> pl.DataFrame:
    return table.with_columns(pl.coalesce("encounter", "image_id").alias("_group"))


def _eligible(table: pl.DataFrame, protocol: str) -> set[str]:
    """Identities that can be held out: they must be able to give a query a true match."""
    stats = table.group_by("identity").agg(
        pl.len().alias("n"), pl.col("_group").n_unique().alias("groups"), pl.col("camera").n_unique().alias("cams")
    )
    if protocol == "leave_one_out":
        ok = stats.filter(pl.col("n") >= 2)
    elif protocol == "market1501":
        ok = stats.filter((pl.col("groups") >= 2) & (pl.col("cams") >= 2))
    else:
        ok = stats.filter(pl.col("groups") >= 2)
    return set(ok["identity"].to_list())


def _valid_queries(q_cams: list[str], g_cams: list[str]) -> int:
    """Query images that keep a same-identity gallery image under market1501."""
    gset = set(g_cams)
    return sum(1 for c in q_cams if gset - {c})


def _assign_query_gallery(rows: pl.DataFrame, rng: np.random.Generator, cfg: SplitConfig, protocol: str,
                          names: tuple[str, str]) -> dict[str, str]:
    """Split one identity's encounters into query and gallery; image_id -> part name."""
    if protocol == "leave_one_out":
        return dict.fromkeys(rows["image_id"].to_list(), names[0])
    groups = sorted(rows["_group"].unique().to_list())
    n_q = int(np.clip(round(cfg.query_fraction * len(groups)), 1, len(groups) - 1))
    cams = dict(zip(rows["image_id"].to_list(), rows["camera"].to_list()))
    by_group = rows.group_by("_group", maintain_order=True).agg("image_id")
    members = dict(zip(by_group["_group"].to_list(), by_group["image_id"].to_list()))
    best, best_score = None, -1
    for _ in range(20 if protocol == "market1501" else 1):
        order = rng.permutation(len(groups))
        q_groups = {groups[i] for i in order[:n_q]}
        assign = {im: names[0] if g in q_groups else names[1] for g in groups for im in members[g]}
        q = [cams[i] for i, p in assign.items() if p == names[0]]
        g = [cams[i] for i, p in assign.items() if p == names[1]]
        score = _valid_queries(q, g) if protocol == "market1501" else len(q)
        if score > best_score:
            best, best_score = assign, score
        if protocol == "market1501" and score == len(q):
            break
    assert best is not None
    return best


def _assign_by_time(rows: pl.DataFrame, cfg: SplitConfig, names: tuple[str, str]) -> dict[str, str] | None:
    """The latest encounters of one identity as its queries (None when some encounter has no date).

    An encounter's date is its earliest photo's; ties go by encounter name, so the result is fixed."""
    if rows["date"].null_count():
        return None
    when = rows.group_by("_group").agg(pl.col("date").min()).sort("date", "_group")
    groups = when["_group"].to_list()
    n_q = int(np.clip(round(cfg.query_fraction * len(groups)), 1, len(groups) - 1))
    query = set(groups[len(groups) - n_q:])
    return {im: names[0] if g in query else names[1] for im, g in zip(rows["image_id"].to_list(), rows["_group"].to_list())}


def _hold_out_unknown(table: pl.DataFrame, idents: list[str], cfg: SplitConfig, stage: Stage, query: str,
                      name: str) -> dict[str, str]:
    """Pick ``unknown_fraction`` of ``idents`` (at least one, never all) and make all their images queries.

    A separate random stream picks them, so the known identities keep exactly the query/gallery
    assignment of the closed-set split with the same seed."""
    if len(idents) < 2:
        raise DataError(f"{name}: {len(idents)} {stage} identities cannot be split into known and unknown ones; "
                        f"raise {'val' if stage == 'val' else 'test'}_fraction or set unknown_fraction: 0")
    n = int(np.clip(round(cfg.unknown_fraction * len(idents)), 1, len(idents) - 1))
    rng = np.random.default_rng([cfg.seed, 1 if stage == "val" else 2])
    ordered = sorted(idents)
    chosen = [ordered[i] for i in rng.permutation(len(ordered))[:n]]
    images = table.filter(pl.col("identity").is_in(chosen))["image_id"].to_list()
    return dict.fromkeys(images, query)


def _refuse_leave_one_out(cfg: SplitConfig, protocol: str, name: str) -> None:
    if protocol != "leave_one_out":
        return
    if cfg.unknown_fraction > 0:
        raise DataError(f"{name}: unknown_fraction needs a gallery apart from the queries, and protocol "
                        "'leave_one_out' has none (query set = gallery set; there an identity is unknown only when it "
                        "has a single image). Set unknown_fraction: 0, or use protocol 'none' for an open-set split")
    if cfg.time_aware:
        raise DataError(f"{name}: time_aware orders queries after gallery images, and protocol 'leave_one_out' has no "
                        "separate gallery; set time_aware: false or use protocol 'none'")


def build_split(cat: Catalogue, cfg: SplitConfig = SplitConfig()) -> Split:
    """Split ``cat``; pre-split catalogues keep their test set and carve validation out of train."""
    protocol = cfg.protocol or cat.default_protocol
    _refuse_leave_one_out(cfg, protocol, cat.name)
    table = _groups(cat.table)
    rng = np.random.default_rng(cfg.seed)
    pre_split = table["given_split"].is_not_null().any()
    if pre_split and table["given_split"].is_null().any():
        raise DataError(f"{cat.name}: some images have a given split and some do not")
    assign: dict[str, str] = {}
    if pre_split:
        pool = table.filter(pl.col("given_split") == "train")
        assign.update(dict(zip(table["image_id"].to_list(), table["given_split"].to_list())))
        test_ids: list[str] = []
    else:
        pool = table
        ids = sorted(table["identity"].unique().to_list())
        eligible = _eligible(table, protocol)
        order = [ids[i] for i in rng.permutation(len(ids))]
        n_test = round(cfg.test_fraction * len(ids))
        test_ids = [i for i in order if i in eligible][:n_test]
        if len(test_ids) < n_test or (cfg.test_fraction > 0 and not test_ids):
            raise DataError(f"{cat.name}: only {len(eligible)} identities can form query/gallery pairs under protocol "
                            f"{protocol!r}; lower test_fraction or change the protocol")
        assign.update(dict.fromkeys(table["image_id"].to_list(), "train"))
    pool_ids = sorted(pool["identity"].unique().to_list())
    pool_eligible = _eligible(pool, protocol) - set(test_ids)
    pool_order = [pool_ids[i] for i in rng.permutation(len(pool_ids))]
    n_val = max(1, round(cfg.val_fraction * len(pool_ids))) if cfg.val_fraction > 0 else 0
    val_ids = [i for i in pool_order if i in pool_eligible][:n_val]
    if n_val and not val_ids:
        raise DataError(f"{cat.name}: no training identity can be held out for validation under protocol {protocol!r} "
                        "(each needs two encounters, or two cameras for market1501)")
    timed = {"val": 0, "test": 0}
    for ident, names in [(i, ("val_query", "val_gallery")) for i in val_ids] + [(i, ("query", "gallery")) for i in test_ids]:
        rows = table.filter(pl.col("identity") == ident)
        by_time = _assign_by_time(rows, cfg, names) if cfg.time_aware else None
        timed["val" if names[0] == "val_query" else "test"] += by_time is not None
        assign.update(by_time if by_time is not None else _assign_query_gallery(rows, rng, cfg, protocol, names))
    unknown = {"val": 0, "test": 0}
    if cfg.unknown_fraction > 0:
        if pre_split:  # the given test set: its identities with query or gallery images
            test_ids = sorted(table.filter(pl.col("given_split") != "train")["identity"].unique().to_list())
        for stage, idents, query in (("val", val_ids, "val_query"), ("test", test_ids, "query")):
            held = _hold_out_unknown(table, idents, cfg, stage, query, cat.name)  # type: ignore[arg-type]
            assign.update(held)
            unknown[stage] = table.filter(pl.col("image_id").is_in(list(held)))["identity"].n_unique()
        log.info("%s: %d validation and %d test identities held out as unknown", cat.name, unknown["val"], unknown["test"])
    if cfg.time_aware:
        log.info("%s: %d validation and %d test identities have dated encounters; their latest are queries",
                 cat.name, timed["val"], timed["test"])
    out = cat.table.with_columns(pl.col("image_id").replace_strict(assign).alias("split")).drop("given_split")
    if not cfg.time_aware:
        out = out.drop("date")  # recorded only where it decided the split (file and hash unchanged otherwise)
    if protocol == "leave_one_out" and pre_split:
        out = out.filter(pl.col("split") != "gallery")
    header = {
        "format": FORMAT,
        "builder_version": str(BUILDER_VERSION),
        "dataset": cat.name,
        "species": cat.species,
        "protocol": protocol,
        "video": str(cat.video).lower(),
        "seed": str(cfg.seed),
        "catalogue_sha256": cat.sha256(),
        "config": json.dumps(to_dict(cfg), sort_keys=True),
    }
    if cfg.unknown_fraction > 0:
        header.update(unknown_val=str(unknown["val"]), unknown_test=str(unknown["test"]))
    if cfg.time_aware:
        header.update(time_ordered_val=str(timed["val"]), time_ordered_test=str(timed["test"]))
    split = Split(out.sort("split", "identity", "image_id"), header, cat.root)
    check_split(split, built=True)
    return split


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def check_split(split: Split, *, built: bool = False) -> None:
    """Raise :class:`DataError` for an unusable split; warn about queries the protocol skips."""
    t = split.table
    needed = ["train", "val_query", "query"] + ([] if split.leave_one_out else ["val_gallery", "gallery"])
    empty = [s for s in needed if t.filter(pl.col("split") == s).height == 0]
    if empty:
        raise DataError(f"split of {split.dataset!r} has empty part(s) {empty}: the dataset is too small for the "
                        "fractions, or lacks identities with two encounters")
    ids = {s: set(split.part(s)["identity"].unique().to_list()) for s in SPLITS}
    val, test = ids["val_query"] | ids["val_gallery"], ids["query"] | ids["gallery"]
    for a, b, sa, sb in [(ids["train"], val, "train", "validation"), (ids["train"], test, "train", "test"),
                         (val, test, "validation", "test")]:
        both = sorted(a & b)
        if both:
            raise DataError(f"split of {split.dataset!r}: {len(both)} identities are in both {sa} and {sb}:"
                            f"{list_paths(both)}\nRe-number identities so that the sets are disjoint, or rebuild the split.")
    for stage in ("val", "test"):
        q, g = split.query_gallery(stage)  # type: ignore[arg-type]
        _check_query_gallery(split, stage, q, g, built)


def _check_query_gallery(split: Split, stage: str, q: pl.DataFrame, g: pl.DataFrame, built: bool) -> None:
    n_unknown = 0
    if not split.leave_one_out:
        orphans = q.filter(~pl.col("identity").is_in(g["identity"].unique().to_list()))
        expected = int(split.header.get(f"unknown_{stage}", 0))
        found = orphans["identity"].n_unique()
        if found and not expected:
            raise DataError(f"{split.dataset} {stage}: {orphans.height} query images have no image of their identity "
                            f"in the gallery:{list_paths(orphans['path'].to_list())}\nMove some of each identity's "
                            "images to the gallery, or drop these queries.")
        if found != expected:
            raise DataError(f"{split.dataset} {stage}: {found} identities have no gallery image but the split header "
                            f"records unknown_{stage}: {expected}; the file was edited: rebuild the split")
        n_unknown = orphans.height
        q = q.filter(pl.col("identity").is_in(g["identity"].unique().to_list()))  # the known queries
        qg = set(_groups(q)["_group"].to_list()) & set(_groups(g)["_group"].to_list())
        if qg:
            msg = f"{split.dataset} {stage}: {len(qg)} encounters straddle query and gallery: {sorted(qg)[:5]}"
            if built:
                raise DataError(msg)
            log.warning("%s (this is the dataset's published split)", msg)
    keys = ["identity"] if split.protocol != "market1501" else ["identity", "camera"]
    if split.leave_one_out:
        n_valid = q.group_by("identity").len().filter(pl.col("len") >= 2)["len"].sum()
    elif split.protocol == "market1501":
        gc = g.group_by("identity").agg(pl.col("camera").unique().alias("gcams"))
        j = q.join(gc, on="identity", how="left")
        n_valid = j.filter(pl.col("gcams").list.set_difference(pl.concat_list("camera")).list.len() > 0).height
    else:
        n_valid = q.filter(pl.col("identity").is_in(g["identity"].to_list())).height
    if n_valid == 0:
        raise DataError(f"{split.dataset} {stage}: protocol {split.protocol!r} leaves no query with a true match "
                        f"(keys {keys}); with one camera per split use protocol 'none'")
    if n_valid < q.height:
        log.warning("%s %s: %d of %d queries have no true match under %r and will be skipped",
                    split.dataset, stage, q.height - n_valid, q.height, split.protocol)
    if n_unknown:
        log.info("%s %s: %d queries of unknown identities (open set); ranking metrics skip them",
                 split.dataset, stage, n_unknown)


# ---------------------------------------------------------------------------------------------
# File format
# ---------------------------------------------------------------------------------------------

FILE_COLUMNS = ["image_id", "path", "identity", "camera", "encounter", "split", "bbox_x", "bbox_y", "bbox_w", "bbox_h"]


def _serialise(split: Split, *, with_root: bool) -> str:
    header = dict(split.header)
    if with_root:
        header["root"] = str(split.root)
    dated = ["date"] if "date" in split.table.columns else []  # time-aware splits record their dates
    rel = split.table.with_columns(
        pl.col("path").map_elements(lambda p: _relative(p, split.root), return_dtype=pl.String)
    ).select(FILE_COLUMNS + dated)
    lines = "".join(f"# {k}: {v}\n" for k, v in header.items())
    return lines + rel.write_csv()


def _relative(path: str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path


def write_split(split: Split, path: str | Path) -> Path:
    """Write atomically; returns the path."""
    path = Path(path)
    atomic_write_text(path, _serialise(split, with_root=True))
    return path


def read_split(path: str | Path, root: str | Path | None = None, *, check: bool = True) -> Split:
    """Read a split file; ``root`` overrides the recorded data location (data moved machines).
    ``check=False`` skips the usability checks (and their warnings) when only reading records."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(f"split file {path} not found; build it with `python -m indivaid.data.prepare`") from None
    header: dict[str, str] = {}
    body = []
    for line in text.splitlines(keepends=True):
        if line.startswith("# ") and not body:
            key, _, value = line[2:].rstrip("\n").partition(": ")
            header[key] = value
        else:
            body.append(line)
    if header.get("format") != FORMAT:
        raise DataError(f"{path}: not a split file of format {FORMAT} (header format={header.get('format')!r})")
    base = Path(root) if root else Path(header.pop("root", path.parent))
    header.pop("root", None)
    schema = {c: (COLUMNS.get(c, pl.String)) for c in FILE_COLUMNS}
    df = pl.read_csv(io.StringIO("".join(body)), schema_overrides=schema)
    if "date" in df.columns:
        df = df.with_columns(pl.col("date").cast(pl.String).str.to_datetime(time_unit="us", strict=False))
    bad = sorted(set(df["split"].unique().to_list()) - set(SPLITS))
    if bad:
        raise DataError(f"{path}: unknown split values {bad}; allowed {SPLITS}")
    df = df.with_columns(pl.col("path").map_elements(lambda p: str(base / p), return_dtype=pl.String),
                         pl.col("camera").fill_null("0"))
    split = Split(df, header, base)
    if check:
        check_split(split)
    return split
