"""The embedding file: one Parquet row per photo, read and written with pyarrow alone.

Columns: ``path``, ``identity`` (null where unknown), ``bbox_x/y/w/h``, any metadata columns
(strings: site, camera, date...), and ``embedding``, a fixed-size list of float32 (L2-normalised).
The schema metadata key ``indivaid`` holds JSON naming the model that made the vectors (its
fingerprint: the hash of its config and split), its distance and the dimension, so that a
gallery embedded by another model is refused instead of silently mis-ranked. ``indivaid embed``
(torch) and ``indivaid_field embed`` (ONNX Runtime) write the same files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from indivaid_field import FieldError

#: The Parquet schema metadata key: the model that made the file and its distance.
EMBED_META = b"indivaid"
#: Columns every embedding file may hold besides metadata; a table may not use these names.
RESERVED = ("path", "identity", "embedding", "bbox_x", "bbox_y", "bbox_w", "bbox_h")


def vectors_column(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """``(N, D)`` float32 as an Arrow fixed-size list (polars reads it as ``Array(Float32, D)``)."""
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    if v.ndim != 2:
        raise ValueError(f"vectors must be (N, D), got shape {v.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])


def write_embeddings(path: str | Path, rows: pa.Table, vectors: np.ndarray, info: dict[str, Any]) -> None:
    """Write ``rows`` (path, identity, bbox_*, metadata) plus their ``embedding`` column, with ``info``
    (model fingerprint, checkpoint, metric, dim) in the schema metadata."""
    if rows.num_rows != len(vectors):
        raise ValueError(f"{rows.num_rows} rows but {len(vectors)} vectors")
    table = rows.append_column(pa.field("embedding", pa.list_(pa.float32(), int(vectors.shape[1]))),
                               vectors_column(vectors))
    meta = {**(table.schema.metadata or {}), EMBED_META: json.dumps(info).encode()}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata(meta), out)


def read_info(path: str | Path) -> dict[str, Any]:
    """The ``indivaid`` schema metadata of an embedding file ({} for files without it)."""
    raw = (pq.read_schema(path).metadata or {}).get(EMBED_META)
    return json.loads(raw) if raw else {}


def check_model(path: str | Path, info: dict[str, Any], fingerprint: str, flag: str = "--gallery") -> None:
    """Refuse a gallery embedded by another model (the vectors would not be comparable)."""
    if info.get("model") not in (None, fingerprint):
        raise FieldError(f"{flag} {path} was embedded by another model ({info.get('checkpoint')}); embed the "
                         "gallery again with this model")


def to_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """An ``embedding`` column as a writable ``(N, D)`` float32 array (fixed-size or plain lists)."""
    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_fixed_size_list(col.type):
        flat = col.flatten().to_numpy(zero_copy_only=False)
        return np.array(flat, dtype=np.float32).reshape(len(col), col.type.list_size)
    return np.array(col.to_pylist(), dtype=np.float32)  # older files: variable-length lists


def read_embeddings(path: str | Path, flag: str = "--gallery") -> tuple[pa.Table, np.ndarray, dict[str, Any]]:
    """An embedding file's rows (without the vectors), its ``(N, D)`` float32 vectors and its info."""
    file = Path(path)
    if not file.is_file():
        raise FieldError(f"{flag} {file}: not found; make it with `embed`")
    try:
        table = pq.read_table(file)
    except (pa.ArrowInvalid, OSError) as e:
        raise FieldError(f"{flag} {file}: not a Parquet file ({e})") from None
    if "embedding" not in table.column_names or "identity" not in table.column_names:
        raise FieldError(f"{flag} {file}: not an embedding file (needs identity and embedding columns)")
    info = json.loads((table.schema.metadata or {}).get(EMBED_META, b"{}"))
    vectors = to_matrix(table.column("embedding"))
    return table.drop_columns(["embedding"]), vectors, info
