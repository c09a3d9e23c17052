"""Finding and reading sweep folders: ``trials.parquet`` conformed to the results schema
(harness.results), ``manifest.json`` checked for its schema version, newest sweep per dataset x method.

A results location is a local folder or any URI the sweep's storage takes (``s3://bucket/prefix?
endpoint_override=HOST:PORT&scheme=http``, ``gs://``, ``file://``): its files are read through
harness.storage, so a leaderboard of a cluster's S3 results needs no copy."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from harness.leaderboard.common import REHEARSAL_MARK, LeaderboardError
from harness.results import SCHEMA_VERSION, TRIAL_SCHEMA, conform
from harness.storage import Storage, child, is_uri, open_storage

log = logging.getLogger(__name__)

MAX_DEPTH = 3  # results/<group>/<sweep>/trials.parquet at most
REQUIRED = ("dataset", "method", "phase")  # what makes a parquet file a trials table


@dataclass(frozen=True)
class Loaded:
    """All trials of all sweep folders found, and one row per sweep folder (for headers and plots)."""

    trials: pl.DataFrame
    sweeps: pl.DataFrame


def supported_schema_version() -> int:
    """The results schema this code reads: the one harness.results defines and the sweep writes."""
    return SCHEMA_VERSION


def find_sweep_dirs(dirs: Sequence[Path]) -> list[Path]:
    """Sweep folders (holding trials.parquet) at or below each dir, sorted, without duplicates.

    The walk stops at a sweep folder (its Tune trees can hold thousands of folders) and MAX_DEPTH
    levels down. A sweep folder with no trials.parquet yet (no experiment finished) is skipped, logged.
    """
    found: list[Path] = []
    for top in dirs:
        if not top.is_dir():
            continue
        base_depth = len(top.resolve().parts)
        for root, subdirs, files in os.walk(top):
            here = Path(root)
            if "trials.parquet" in files:
                found.append(here)
                subdirs.clear()
                continue
            if "sweep.yaml" in files or "manifest.json" in files:
                log.warning("%s: sweep folder without trials.parquet (no experiment finished yet): skipped", here)
                subdirs.clear()
                continue
            subdirs[:] = sorted(s for s in subdirs if not s.startswith(".") and s != "cache")
            if len(here.resolve().parts) - base_depth >= MAX_DEPTH:
                subdirs.clear()
    unique = {p.resolve(): p for p in found}
    return [unique[k] for k in sorted(unique)]


def find_remote_sweeps(location: str) -> list[str]:
    """Sweep folders at or below a URI, as :func:`find_sweep_dirs` finds them on a local disk (one
    listing per folder visited), as URIs."""
    try:
        store = open_storage(location)
        found: list[str] = []

        def walk(rel: str, depth: int) -> None:
            entries = {i.base_name: i for i in store.list(rel)}
            if "trials.parquet" in entries:
                found.append(child(location, rel))
                return
            if "sweep.yaml" in entries or "manifest.json" in entries:
                log.warning("%s: sweep folder without trials.parquet (no experiment finished yet): skipped",
                            store.uri(rel))
                return
            if depth >= MAX_DEPTH:
                return
            for name, entry in sorted(entries.items()):
                if entry.type.name == "Directory" and not name.startswith(".") and name != "cache":
                    walk(f"{rel}/{name}".strip("/"), depth + 1)

        walk("", 0)
    except Exception as e:  # pyarrow's errors for a wrong endpoint, bucket or credentials vary by store
        raise LeaderboardError(f"{location}: cannot list it ({e})") from None
    return found


def sweep_locations(locations: Sequence[str | Path]) -> list[tuple[str, Storage]]:
    """(how to name it, its storage) of every sweep folder at or below each location."""
    out: list[tuple[str, Storage]] = []
    local = [Path(loc) for loc in locations if not is_uri(str(loc))]
    out += [(str(d), open_storage(str(d))) for d in find_sweep_dirs(local)]
    for loc in locations:
        if is_uri(str(loc)):
            out += [(uri, open_storage(uri)) for uri in find_remote_sweeps(str(loc))]
    return out


def read_manifest(sweep_dir: Storage | Path, supported: int) -> dict[str, Any]:
    """The sweep's manifest.json, refusing a missing one (sweep not finished writing) or another schema."""
    store = sweep_dir if isinstance(sweep_dir, Storage) else open_storage(str(sweep_dir))
    path = store.uri("manifest.json")
    try:
        text = store.read_text("manifest.json")
    except (OSError, UnicodeDecodeError) as e:
        raise LeaderboardError(f"{path}: unreadable manifest ({e})") from None
    if text is None:
        raise LeaderboardError(
            f"{path} is missing: the sweep did not finish writing its results; re-run it with "
            f"`python -m harness.sweep FILE --resume` (its config is in {store.uri('sweep.yaml')})")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise LeaderboardError(f"{path}: unreadable manifest ({e})") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != supported:
        raise LeaderboardError(f"{path}: schema_version {version!r} is not supported (this harness reads "
                               f"schema_version {supported}); use the harness version that wrote it")
    return manifest


def read_trials(path: Storage | Path) -> pl.DataFrame:
    """trials.parquet (a file, or the one in a sweep's storage) conformed to the results schema
    (every column in its dtype, absent ones null: older files and partial sweeps load the same
    way), plus the params."""
    where = path.uri("trials.parquet") if isinstance(path, Storage) else str(path)
    try:
        df = pl.read_parquet(io.BytesIO(path.read_bytes("trials.parquet") or b"") if isinstance(path, Storage) else path)
    except (pl.exceptions.PolarsError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LeaderboardError(f"{where}: unreadable parquet file ({first})") from None
    if df.height == 0:  # harness.sweep writes an empty table before any trial has a folder
        log.warning("%s: no trials yet", where)
        return pl.DataFrame(schema=TRIAL_SCHEMA)
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise LeaderboardError(f"{where}: not a trials table (missing column(s) {', '.join(missing)})")
    out = conform(df)
    # a NaN metric (a diverged run) is a missing value, not a number to average or test
    return out.with_columns(pl.col(pl.Float64).fill_nan(None))


def load_results(dirs: Sequence[str | Path]) -> Loaded:
    """Every sweep under dirs (local folders or URIs), concatenated; each row labelled with its sweep
    (``sweep_id``) and the sweep's age (``_order``: 0 = oldest, by manifest started_at (older
    files: written_at), else the newest trial's created_at)."""
    sweep_dirs = sweep_locations(dirs)
    if not sweep_dirs:
        where = ", ".join(str(d) for d in dirs)
        raise LeaderboardError(f"no results found: no trials.parquet in {where} or its subfolders; "
                               f"`python -m harness.sweep sweeps/smoke.yaml` creates some")
    supported = supported_schema_version()
    frames, infos = [], []
    for d, store in sweep_dirs:
        manifest = read_manifest(store, supported)
        trials = read_trials(store)
        name = (manifest.get("sweep") or {}).get("name") or (trials["sweep_id"].drop_nulls().first()) or \
            d.rstrip("/").rsplit("/", 1)[-1]
        # when the sweep started: a later --resume rewrites written_at but is not a newer sweep
        stamp = manifest.get("started_at", manifest.get("written_at"))
        if not isinstance(stamp, (int, float)):
            stamp = trials["created_at"].max() or 0.0
        if manifest.get("rehearsal"):  # CPU rehearsal of a sweep: labelled, and compared only among themselves
            trials = trials.with_columns(pl.format("{} {}", "dataset", pl.lit(REHEARSAL_MARK)).alias("dataset"))
        frames.append(trials.with_columns(pl.lit(bool(manifest.get("rehearsal"))).alias("_rehearsal")))
        infos.append({"sweep_id": str(name), "dir": str(d), "written_at": float(stamp),
                      "git_commit": manifest.get("git_commit"), "n_trials": trials.height})
    sweeps = pl.DataFrame(infos, schema={"sweep_id": pl.String, "dir": pl.String, "written_at": pl.Float64,
                                         "git_commit": pl.String, "n_trials": pl.Int64})
    # Two folders with the same sweep name (copies from two clusters): label them apart by folder.
    sweeps = sweeps.with_columns(
        pl.when(pl.len().over("sweep_id") > 1).then(pl.format("{} ({})", "sweep_id", "dir")).otherwise("sweep_id")
        .alias("sweep_id"))
    order = sweeps.with_row_index("_i").sort("written_at", "dir")["_i"].to_list()
    rank = {i: r for r, i in enumerate(order)}
    labelled = [f.with_columns(pl.lit(sweeps["sweep_id"][i]).alias("sweep_id"),
                               pl.lit(rank[i], pl.Int64).alias("_order"))
                for i, f in enumerate(frames)]
    trials = pl.concat(labelled, how="diagonal_relaxed")
    if not trials.height:
        raise LeaderboardError(f"no results found: the sweeps under {', '.join(str(d) for d in dirs)} have no trials "
                               f"yet; `python -m harness.sweep sweeps/smoke.yaml` creates some")
    log.info("loaded %d trial(s) from %d sweep(s): %s", trials.height, sweeps.height, ", ".join(sweeps["dir"]))
    return Loaded(trials=trials, sweeps=sweeps.sort("written_at", "dir"))


def select_newest(trials: pl.DataFrame) -> pl.DataFrame:
    """Newest wins: per dataset x method, only the trials of the newest sweep that ran it.

    Per dataset x method rather than per dataset, so a later sweep of one method (or an ablation
    sweep) replaces that method's row without deleting the other methods' rows of older sweeps.
    """
    newest = trials.filter(pl.col("_order") == pl.col("_order").max().over("dataset", "method"))
    dropped = trials.height - newest.height
    if dropped:
        log.info("newest sweep wins per dataset x method: %d trial(s) of older sweeps left out (--all keeps them)",
                 dropped)
    return newest


def with_scope(trials: pl.DataFrame, keep_all: bool) -> pl.DataFrame:
    """``_scope``: what rows are compared within (Holm, mean rows): the sweep with --all, else all real
    results together and all rehearsals together (never mixed)."""
    kind = pl.when(pl.col("_rehearsal")).then(pl.lit("rehearsal")).otherwise(pl.lit(""))
    return trials.with_columns((pl.format("{}{}", "sweep_id", kind) if keep_all else kind).alias("_scope"))
