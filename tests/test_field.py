"""The field package: torch-free, and its numpy search and decision agree with the torch ones."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from indivaid.eval.distance import distance_matrix
from indivaid_field import FieldError
from indivaid_field.matching import Gallery, decide, gallery_mask, rank_distances


def test_field_package_never_imports_torch_ray_or_open_clip():
    code = (
        "import importlib, pkgutil, sys, indivaid_field\n"
        "for m in pkgutil.walk_packages(indivaid_field.__path__, 'indivaid_field.'):\n"
        "    importlib.import_module(m.name)\n"
        "import onnxruntime, pyarrow.parquet, PIL.Image\n"  # what the field commands load at run time
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('torch', 'ray', 'open_clip', 'torchvision', "
        "'polars', 'indivaid'))\n"
        "print(len([n for n in sys.modules if n.startswith('indivaid_field')]), bad)\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
    assert int(out.stdout.split()[0]) >= 7  # the walk really imported the package (cli, model, matching, ...)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_chunked_search_equals_the_dense_torch_ranking(metric: str):
    """Streaming the gallery in small chunks changes nothing: same individuals, distances and
    nearest images as the dense (Q, G) matrix of indivaid.eval.distance."""
    rng = np.random.default_rng(0)
    q = rng.normal(size=(23, 16)).astype(np.float32)
    g = rng.normal(size=(2000, 16)).astype(np.float32)
    g[7] = g[3]  # an exact tie between two images of different identities
    ids = [f"id{i:03d}" for i in rng.integers(0, 300, len(g))]
    dense = rank_distances(distance_matrix(torch.from_numpy(q), torch.from_numpy(g), metric, normalize=True).numpy(),
                           ids, 5)
    chunked = Gallery(g, ids, metric, chunk=97).search(q, 5)
    assert chunked.identities == dense.identities and np.array_equal(chunked.images, dense.images)
    assert np.array_equal(chunked.codes, dense.codes) and np.array_equal(chunked.best_image, dense.best_image)
    np.testing.assert_allclose(chunked.best, dense.best, atol=1e-5)
    np.testing.assert_allclose(chunked.mean, dense.mean, atol=1e-5)


def test_decision_and_where_are_one_line_errors():
    known, conf = decide(np.array([0.1, 0.5, 0.9]), 0.5, (3.0, -6.0))
    assert known.tolist() == [True, True, False]
    p = 1 / (1 + np.exp(-(3.0 - 6.0 * np.array([0.1, 0.5, 0.9]))))
    np.testing.assert_allclose(conf, [p[0], p[1], 1 - p[2]])
    cols = {"identity": ["a", "b", None], "site": ["n", "s", "n"], "path": ["1", "2", "3"]}
    assert gallery_mask(cols, {"site": "n"}).tolist() == [True, False, False]  # no identity: never a candidate
    with pytest.raises(FieldError, match="no column 'region'; its metadata columns: site"):
        gallery_mask(cols, {"region": "x"}, reserved=("identity", "path"))
    with pytest.raises(FieldError, match=r"values of site: \['n', 's'\]"):
        gallery_mask(cols, {"site": "east"})


def test_catalogue_tables_keep_their_text(tmp_path):
    """Identities and metadata are read as written (no type guessing: 007 stays 007, dates stay
    dates), empty cells are missing, and a Parquet bbox list is kept for parsing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from indivaid_field.cli import table_sources

    (tmp_path / "c.csv").write_text('path,identity,date,bbox\na.jpg,007,2024-01-02,"[1, 2, 3, 4]"\nb.jpg,1e3,2024-01-03,\n')
    t = table_sources(str(tmp_path / "c.csv"), None).to_pylist()
    assert [r["identity"] for r in t] == ["007", "1e3"] and [r["date"] for r in t] == ["2024-01-02", "2024-01-03"]
    assert (t[0]["bbox_x"], t[0]["bbox_h"]) == (1.0, 4.0) and t[1]["bbox_x"] is None
    pq.write_table(pa.table({"path": ["a.jpg"], "identity": ["x"], "bbox": [[1.0, 2.0, 3.0, 4.0]]}), tmp_path / "c.parquet")
    assert table_sources(str(tmp_path / "c.parquet"), None).to_pylist()[0]["bbox_w"] == 3.0
