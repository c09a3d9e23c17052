"""ONNX export: ONNX Runtime embeds like torch (features within 1e-4, same ranking), the metadata
carries what the field needs, and the torch-free field commands decide like `indivaid match`."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from indivaid.__main__ import main
from indivaid.data import read_split
from indivaid.inference import load_inference
from indivaid_field.cli import main as field_main
from indivaid_field.matching import Gallery
from indivaid_field.model import OnnxModel

pytestmark = pytest.mark.timeout(600)  # the session fixture open_runs trains once (conftest: about a minute)


@pytest.fixture(scope="module")
def exported(open_runs, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The trained open-set checkpoint (it has a calibrated threshold) and its ONNX export."""
    ckpt = open_runs["clipreid"].checkpoint
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert main(["export", "--checkpoint", ckpt, "--out", str(out)]) == 0
    return ckpt, out


@pytest.fixture(scope="module")
def test_photos(open_runs) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The test split's query and gallery photos."""
    split = read_split(Path(open_runs["clipreid"].workdir) / "split.csv")
    return split.part("query"), split.part("gallery")


def test_onnx_runtime_embeds_like_torch_and_ranks_the_gallery_alike(exported, test_photos):
    ckpt, onnx = exported
    query, gallery = test_photos
    q_paths, g_paths = query["path"].to_list()[:40], gallery["path"].to_list()
    torch_model, field_model = load_inference(ckpt), OnnxModel(onnx)
    for paths in (q_paths, g_paths):
        want = torch_model.embed_files(paths).numpy()
        got = field_model.embed_files(paths, batch=7, output="feature")  # another batch size than traced
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-4
    q_t, g_t = (torch_model.embed_files(p).numpy() for p in (q_paths, g_paths))
    q_o, g_o = (field_model.embed_files(p) for p in (q_paths, g_paths))
    np.testing.assert_allclose(np.linalg.norm(q_o, axis=1), 1.0, atol=1e-5)  # the embedding output is L2-normalised

    def distances(q: np.ndarray, g: np.ndarray) -> np.ndarray:  # float64, normalised, as match compares them
        q, g = (x.astype(np.float64) / np.linalg.norm(x, axis=1, keepdims=True) for x in (q, g))
        return np.sqrt(((q[:, None, :] - g[None]) ** 2).sum(-1))

    d_torch = distances(q_t, g_t)
    onnx_order = np.argsort(distances(q_o, g_o), axis=1, kind="stable")
    torch_order = np.argsort(d_torch, axis=1, kind="stable")
    # every query orders all gallery images as torch does; two images may swap only where torch itself
    # puts them within 1e-6 of each other (the synthetic gallery has near-duplicate photos)
    along = np.take_along_axis(d_torch, onnx_order, axis=1)
    assert (along[:, :-1] - along[:, 1:]).max() < 1e-6
    assert np.array_equal(onnx_order[:, 0], torch_order[:, 0])
    ids = gallery["identity"].to_list()
    a, b = Gallery(g_t, ids).search(q_t, 5), Gallery(g_o, ids).search(q_o, 5)
    assert np.array_equal(a.codes, b.codes) and np.abs(a.best - b.best).max() < 1e-5  # individuals ranked alike


def test_metadata_has_preprocessing_version_and_calibrated_threshold(exported):
    ckpt, onnx = exported
    model, field_model = load_inference(ckpt), OnnxModel(onnx)
    meta = field_model.meta
    assert [meta["input_height"], meta["input_width"]] == list(model.cfg.model.input_size)
    assert meta["mean"] == list(model.cfg.augment.mean) and meta["std"] == list(model.cfg.augment.std)
    assert meta["resize"] == model.spec.resize and meta["pixel_scale"] == pytest.approx(1 / 255)
    assert meta["embedding_normalization"] == "l2" and meta["embedding_dim"] == 96 and meta["metric"] == model.metric
    assert field_model.fingerprint == model.fingerprint  # galleries embedded either way are interchangeable
    assert field_model.threshold == model.calibration.threshold
    assert field_model.probability == pytest.approx(model.calibration.probability)
    shape = field_model.session.get_inputs()[0].shape
    assert isinstance(shape[0], str) and shape[1:] == [3, *model.cfg.model.input_size]  # dynamic batch, fixed size


def _catalogue(test_photos, root: Path) -> tuple[Path, Path]:
    """Known individuals' gallery photos, and one new photo per query identity (known and new)."""
    query, gallery = test_photos
    for r in gallery.iter_rows(named=True):
        (root / "gallery" / r["identity"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(r["path"], root / "gallery" / r["identity"])
    for r in query.group_by("identity", maintain_order=True).head(1).iter_rows(named=True):
        (root / "new" / r["identity"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(r["path"], root / "new" / r["identity"])
    return root / "gallery", root / "new"


def test_field_commands_and_match_onnx_decide_like_torch(exported, test_photos, tmp_path: Path, capsys):
    ckpt, onnx = exported
    gallery, new = _catalogue(test_photos, tmp_path)
    g_torch, g_field = tmp_path / "g_torch.parquet", tmp_path / "g_field.parquet"
    assert main(["embed", "--checkpoint", ckpt, "--images", str(gallery), "--meta", "site=north",
                 "--out", str(g_torch)]) == 0
    assert field_main(["embed", "--onnx", str(onnx), "--images", str(gallery), "--meta", "site=north",
                       "--out", str(g_field)]) == 0
    a, b = pl.read_parquet(g_torch), pl.read_parquet(g_field)
    assert a.drop("embedding").equals(b.drop("embedding")) and b.schema["embedding"] == pl.Array(pl.Float32, 96)
    assert np.abs(a["embedding"].to_numpy() - b["embedding"].to_numpy()).max() < 1e-5
    outs = {"torch": tmp_path / "torch.csv", "field": tmp_path / "field.csv", "onnx": tmp_path / "onnx.csv"}
    common = ["--images", str(new), "--top-k", "3", "--where", "site=north"]
    assert main(["match", "--checkpoint", ckpt, "--gallery", str(g_torch), *common, "--out", str(outs["torch"])]) == 0
    # the field path on ONNX Runtime, against the gallery torch embedded (and the reverse, through indivaid)
    capsys.readouterr()
    assert field_main(["match", "--onnx", str(onnx), "--gallery", str(g_torch), *common,
                       "--out", str(outs["field"])]) == 0
    printed = capsys.readouterr().out
    assert main(["match", "--onnx", str(onnx), "--gallery", str(g_field), *common, "--out", str(outs["onnx"])]) == 0
    t = pl.read_csv(outs["torch"])
    assert set(t["decision"]) == {"KNOWN", "NEW"}  # the calibrated threshold really decides both ways
    for name in ("field", "onnx"):
        o = pl.read_csv(outs[name])
        assert o.drop("best_distance", "mean_distance", "confidence").equals(
            t.drop("best_distance", "mean_distance", "confidence")), name
        assert np.abs(o["best_distance"].to_numpy() - t["best_distance"].to_numpy()).max() < 1e-4
    n_known = t.filter(pl.col("rank") == 1)["decision"].to_list().count("KNOWN")
    assert f"{n_known} KNOWN" in printed and "calibrated on validation" in printed


def test_field_errors_are_one_line(exported, tmp_path: Path, capsys):
    ckpt, onnx = exported
    assert field_main(["match", "--onnx", str(tmp_path / "none.onnx"), "--gallery", "g.parquet", "--images", "x"]) == 2
    assert "--onnx" in capsys.readouterr().err
    bogus = tmp_path / "other.parquet"
    pl.DataFrame({"path": ["a.jpg"], "identity": ["a"]}).write_parquet(bogus)
    assert field_main(["match", "--onnx", str(onnx), "--gallery", str(bogus), "--images", str(tmp_path)]) == 2
    assert "not an embedding file" in capsys.readouterr().err
    other = tmp_path / "torch_made.parquet"  # made by another model: refused, not mis-ranked
    pl.DataFrame({"path": ["a.jpg"], "identity": ["a"], "embedding": [[0.0] * 96]}).with_columns(
        pl.col("embedding").cast(pl.Array(pl.Float32, 96))).write_parquet(other)
    import pyarrow.parquet as pq

    table = pq.read_table(other)
    pq.write_table(table.replace_schema_metadata({b"indivaid": b'{"model": "0123456789ab", "checkpoint": "x.pt"}'}),
                   other)
    assert field_main(["match", "--onnx", str(onnx), "--gallery", str(other), "--images", str(tmp_path)]) == 2
    assert "was embedded by another model (x.pt)" in capsys.readouterr().err
    assert ckpt  # the torch side words the same errors (tests/test_openset_run.py)
