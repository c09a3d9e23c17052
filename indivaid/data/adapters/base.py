"""The dataset adapter interface and the dataset registry.

An adapter is small: it knows how to parse one layout into a :class:`Catalogue` and carries the
dataset's metadata (species noun for the prompt, citation, default evaluation protocol, expected
counts). Nothing else in the code base branches on dataset names.
"""

from __future__ import annotations

import inspect
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from indivaid.data.catalogue import Catalogue, DataError
from indivaid.eval.metrics import PROTOCOLS
from indivaid.registry import Registry, did_you_mean
from indivaid.utils.io import data_root as resolve_data_root
from indivaid_field.preprocess import IMAGE_SUFFIXES, find_images  # noqa: F401 (shared with the field package)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is, beyond its files. ``expected`` maps a given split to (identities, images)."""

    name: str
    species: str
    citation: str = ""
    source: str = ""
    default_protocol: str = "none"
    video: bool = False
    expected: Mapping[str, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.default_protocol not in PROTOCOLS:
            raise ValueError(f"default_protocol {self.default_protocol!r} not in {PROTOCOLS}")


class DatasetAdapter(ABC):
    """Parses one on-disk layout into a catalogue."""

    info: DatasetInfo
    generated: bool = False  # the files are made on first use (never "missing")

    def default_path(self, data_root: Path, *, create: bool = True) -> Path:
        """Where this dataset lives under the data root when no path is given (``create``: a
        generated dataset is made there first)."""
        return data_root / self.info.name

    @abstractmethod
    def load(self, path: Path) -> Catalogue:
        """Read the dataset at ``path``."""

    def catalogue(self, path: Path, columns: Mapping[str, list]) -> Catalogue:
        """Wrap parsed columns with this adapter's metadata and compare counts to the expected."""
        cat = Catalogue.from_columns(
            columns,
            name=self.info.name,
            species=self.info.species,
            root=path,
            default_protocol=self.info.default_protocol,
            video=self.info.video,
        )
        check_expected_counts(cat, self.info.expected)
        return cat


def check_expected_counts(cat: Catalogue, expected: Mapping[str, tuple[int, int]]) -> None:
    """Warn (not fail) when a split's identity/image counts differ from the published ones."""
    if not expected:
        return
    counts = cat.table.group_by("given_split").agg(pl.col("identity").n_unique().alias("ids"), pl.len().alias("imgs"))
    found = {r["given_split"]: (r["ids"], r["imgs"]) for r in counts.iter_rows(named=True)}
    for split, want in expected.items():
        got = found.get(split, (0, 0))
        if tuple(got) != tuple(want):
            log.warning(
                "%s/%s: found %d identities / %d images, the published split has %d / %d "
                "(a different release or a partial download?)",
                cat.name, split, got[0], got[1], want[0], want[1],
            )


def source_name(path: Path) -> str:
    """The name of user data with no ``name:`` option: its folder's name, or its table file's stem,
    so that two datasets prepared into one data root land in two folders."""
    name = path.stem if path.is_file() else path.name
    if not name or name.startswith("."):
        raise DataError(f"{path}: cannot name a dataset after it; give it a name with -o name=NAME")
    return name


AdapterFactory = Callable[..., DatasetAdapter]
DATASETS: Registry[AdapterFactory] = Registry("dataset")


def make_adapter(name: str, /, **options: Any) -> DatasetAdapter:
    """Build the adapter registered as ``name``; unknown options name the valid ones (``name`` is
    positional-only, so that ``name=`` can be an option: the folder/table/reference datasets')."""
    factory = DATASETS.get(name)
    params = inspect.signature(factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        valid = [k for k, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        for key in options:
            if key not in valid:
                raise DataError(
                    f"dataset {name!r} has no option {key!r}{did_you_mean(key, valid)}; "
                    f"its options: {', '.join(valid) or 'none'}"
                )
    return factory(**options)


def open_dataset(name: str, /, path: str | Path | None = None, data_root: str | Path | None = None,
                 **options: Any) -> Catalogue:
    """Load the dataset registered as ``name`` from ``path`` (default: under the data root)."""
    adapter = make_adapter(name, **options)
    where = Path(path).expanduser().resolve() if path else adapter.default_path(resolve_data_root(data_root))
    if not where.exists():
        raise DataError(
            f"dataset {name!r}: {where} does not exist. Download it (source: {adapter.info.source or 'see README'}) "
            f"and prepare it with `python -m indivaid.data.prepare`, or set the path / INDIVAID_DATA."
        )
    return adapter.load(where)
