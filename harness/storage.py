"""Where a sweep's results live: a local folder, or any URI that pyarrow resolves (``file://``,
``s3://bucket/prefix?endpoint_override=HOST:PORT&scheme=http``, ``gs://``, ``hdfs://`` ...).

Everything the harness keeps as results goes through one :class:`Storage`: trial records, the
trainer's results and inference models, trials.parquet, best.yaml, manifest.json and the
experiment markers; Ray Tune stores its own files and the trials' checkpoints on the same
filesystem. Datasets and the image/feature caches are not results: they stay on file paths
(node-local disk or NFS), where the trainer reads them with memory maps and locks.

Paths inside a storage are relative, ``/``-separated (``search-x-clipreid/<trial>/trial.json``).
Object stores have no folders and no rename: a write is one PUT, which readers see whole or not
at all; on a local filesystem a write goes through a temporary file and a rename for the same
guarantee. Importing this module costs neither torch nor Ray.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs

from indivaid.config import ConfigError
from indivaid.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)


def is_uri(text: str) -> bool:
    """Whether ``text`` names a filesystem by scheme (``s3://``, ``file://``) rather than a path."""
    return "://" in text


def normalize(location: str) -> str:
    """A storage location as the harness keeps it: a local path made absolute (``~`` expanded),
    a URI unchanged (its query, e.g. ``endpoint_override``, is part of how to reach it)."""
    if is_uri(location):
        return location
    return str(Path(location).expanduser().resolve())


def sibling(location: str, name: str) -> str:
    """The location beside ``location`` whose last part is ``name`` (a rehearsal's results beside
    the sweep's), keeping a URI's scheme and query."""
    if not is_uri(location):
        return str(Path(location).parent / name)
    parts = urlsplit(location)
    parent = parts.path.rstrip("/").rsplit("/", 1)[0] if "/" in parts.path.strip("/") else ""
    return urlunsplit(parts._replace(path=f"{parent}/{name}"))


class _AtomicFile(io.FileIO):
    """A file written under a hidden temporary name and renamed into place when closed."""

    def __init__(self, path: str) -> None:
        self._final = path
        head, name = os.path.split(path)
        self._tmp = os.path.join(head, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
        os.makedirs(head or ".", exist_ok=True)  # as pyarrow's local filesystem does
        super().__init__(self._tmp, "wb")

    def write(self, data) -> int:  # type: ignore[override]
        try:
            return super().write(data)
        except BaseException:
            self._failed = True  # a partial file must never replace a good one
            raise

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        if getattr(self, "_failed", False):
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            return
        os.replace(self._tmp, self._final)


class AtomicLocalHandler(pafs.FileSystemHandler):
    """The local filesystem, for pyarrow, with atomic writes: every output stream goes to a hidden
    temporary file that is renamed into place when it is closed.

    Ray Tune uploads its experiment state (``tuner.pkl``, ``experiment_state-*.json``, the
    searcher's state) by copying its staging folder over the storage's, after every trial
    checkpoint. On a plain local filesystem a copy truncates each file first, so a driver killed
    mid-copy leaves empty state files and the experiment can no longer be restored. Object stores
    do not have this problem (a PUT is atomic); a local or NFS storage gets this handler."""

    def __init__(self) -> None:
        self.fs = pafs.LocalFileSystem()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AtomicLocalHandler)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(AtomicLocalHandler)

    def __reduce__(self) -> tuple:  # sent to Ray workers with the storage
        return (AtomicLocalHandler, ())

    def get_type_name(self) -> str:
        return "local-atomic"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to delete the contents of the filesystem's root")

    def delete_file(self, path: str) -> None:
        self.fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        with self.fs.open_input_stream(src) as source, self.open_output_stream(dest, None) as target:
            while chunk := source.read(64 << 20):
                target.write(chunk)

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self.fs.open_input_stream(path)

    def open_input_file(self, path: str) -> pa.NativeFile:
        return self.fs.open_input_file(path)

    def open_output_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        return pa.PythonFile(_AtomicFile(path), mode="w")

    def open_append_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        return self.fs.open_append_stream(path)


def atomic_local_fs() -> pafs.FileSystem:
    """The local filesystem with atomic writes (:class:`AtomicLocalHandler`)."""
    return pafs.PyFileSystem(AtomicLocalHandler())


@dataclass(frozen=True)
class Storage:
    """A folder on some pyarrow filesystem: ``root`` is its path on ``fs``. A local folder's
    filesystem writes every file atomically (:class:`AtomicLocalHandler`), Ray Tune's included."""

    location: str  # as the sweep names it (normalized): a local path or a URI
    fs: pafs.FileSystem
    root: str
    local: bool = False  # on this machine's filesystem (a local disk or a mounted shared one)

    def path(self, *parts: str) -> str:
        """The filesystem path of ``parts`` under the root (what pyarrow and Ray Tune take)."""
        tail = "/".join(seg for p in parts for seg in p.split("/") if seg)  # "a//b", "a/" and "" collapse
        return f"{self.root.rstrip('/')}/{tail}" if tail else self.root

    def uri(self, *parts: str) -> str:
        """How to name ``parts`` to a person or a results table: a local path, or
        ``scheme://path`` (without the query, which only says how to reach the server)."""
        if self.local:
            return self.path(*parts)
        return f"{urlsplit(self.location).scheme}://{self.path(*parts)}"

    def local_path(self, *parts: str) -> Path:
        """``parts`` as a local path; only for a local storage."""
        if not self.local:
            raise ConfigError(f"{self.location} is not a local folder")
        return Path(self.path(*parts))

    # -- reading -----------------------------------------------------------------------------

    def info(self, rel: str) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path(rel))

    def is_file(self, rel: str) -> bool:
        return self.info(rel).type == pafs.FileType.File

    def is_dir(self, rel: str) -> bool:
        return self.info(rel).type == pafs.FileType.Directory

    def exists(self, rel: str) -> bool:
        return self.info(rel).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes | None:
        """The file's bytes, or None while it does not exist."""
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.readall()
        except FileNotFoundError:
            return None
        except OSError as e:  # pyarrow reports a missing object on some stores as a plain OSError
            if self.info(rel).type == pafs.FileType.NotFound:
                return None
            raise OSError(f"{self.uri(rel)}: {e}") from None

    def read_text(self, rel: str) -> str | None:
        data = self.read_bytes(rel)
        return None if data is None else data.decode()

    def read_json(self, rel: str) -> dict:
        """A JSON object, or {} while it is missing (or, on a local disk, half-written)."""
        text = self.read_text(rel)
        try:
            value = json.loads(text) if text else {}
        except json.JSONDecodeError:
            return {}
        return value if isinstance(value, dict) else {}

    def list(self, rel: str = "", recursive: bool = False) -> list[pafs.FileInfo]:
        """Entries under ``rel`` (none if it does not exist), sorted by path."""
        sel = pafs.FileSelector(self.path(rel), recursive=recursive, allow_not_found=True)
        return sorted(self.fs.get_file_info(sel), key=lambda i: i.path)

    def dirs(self, rel: str = "") -> list[str]:
        """Names of the folders directly under ``rel``."""
        return [i.base_name for i in self.list(rel) if i.type == pafs.FileType.Directory]

    def sizes(self, rel: str) -> dict[str, int]:
        """Every file under ``rel`` (recursively, one listing) -> its size; paths relative to ``rel``."""
        base = self.path(rel).rstrip("/") + "/"
        return {i.path.removeprefix(base): int(i.size or 0) for i in self.list(rel, recursive=True)
                if i.type == pafs.FileType.File}

    # -- writing -----------------------------------------------------------------------------

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole file that readers see complete or not at all."""
        if self.local:
            atomic_write_bytes(self.path(rel), data)
            return
        with self.fs.open_output_stream(self.path(rel)) as f:  # one PUT: atomic on object stores
            f.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def write_json(self, rel: str, value: Any) -> None:
        self.write_text(rel, json.dumps(value, indent=2, default=str))

    def append_line(self, rel: str, line: str) -> None:
        """Add a line to a small log file (object stores cannot append: read, add, write back).
        Only for files with a single writer at a time, e.g. one trial's own records."""
        self.write_text(rel, (self.read_text(rel) or "") + line.rstrip("\n") + "\n")

    def touch(self, rel: str) -> None:
        self.write_bytes(rel, b"")

    def mkdir(self, rel: str = "") -> None:
        """Create the folder (a no-op on object stores, where folders exist through their files)."""
        self.fs.create_dir(self.path(rel), recursive=True)

    def upload(self, src: Path, rel: str) -> None:
        """Copy a local file to ``rel``; on a local storage through a temporary file and a rename."""
        if self.local:
            dest = Path(self.path(rel))
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}")  # one per uploader
            shutil.copyfile(src, tmp)
            tmp.replace(dest)
            return
        pafs.copy_files(str(src), self.path(rel), source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)

    def download(self, rel: str, dest: Path) -> bool:
        """Copy ``rel`` to the local file ``dest``; False when it does not exist."""
        if not self.is_file(rel):
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self.path(rel), str(dest), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return True

    def delete_dir(self, rel: str) -> None:
        try:
            self.fs.delete_dir(self.path(rel))
        except FileNotFoundError:
            pass

    def delete_file(self, rel: str) -> None:
        try:
            self.fs.delete_file(self.path(rel))
        except FileNotFoundError:
            pass


@functools.lru_cache(maxsize=32)
def open_storage(location: str) -> Storage:
    """The storage at ``location`` (a path or a URI; one filesystem object per location and process).

    Credentials come from where pyarrow looks for them on each node (for S3: the AWS_* environment
    variables, ``~/.aws``, an instance profile); the URI's query sets the rest
    (``endpoint_override``, ``scheme``, ``region``, ...).
    """
    location = normalize(location)
    if not is_uri(location):
        return Storage(location, atomic_local_fs(), location, local=True)
    try:
        fs, root = pafs.FileSystem.from_uri(location)
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ConfigError(f"storage {location!r}: pyarrow cannot open it ({e}); use a local path or a URI such as "
                          "s3://bucket/prefix?endpoint_override=HOST:PORT&scheme=http, gs://bucket/prefix or "
                          "file:///abs/path") from None
    if isinstance(fs, pafs.LocalFileSystem):
        return Storage(location, atomic_local_fs(), root.rstrip("/") or "/", local=True)
    return Storage(location, fs, root.rstrip("/"))


def child(location: str, rel: str) -> str:
    """The location of ``rel`` under ``location``, keeping a URI's scheme and query."""
    rel = rel.strip("/")
    if not rel:
        return location
    if not is_uri(location):
        return str(Path(location) / rel)
    parts = urlsplit(location)
    return urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{rel}"))
