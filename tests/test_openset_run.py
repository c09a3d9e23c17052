"""Open-set runs end to end: the calibrated decision learns (trained vs untrained, and against the
threshold an oracle would pick on test), and `match` decides KNOWN <id> / NEW per photo."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import write_image

from indivaid.__main__ import main
from indivaid.data import read_split

pytestmark = pytest.mark.timeout(600)  # the session fixture open_runs trains once (conftest: about a minute)

#: how far the validation-calibrated test GM may fall below the best GM any threshold gets on test
ORACLE_MARGIN = 0.15


def test_trained_model_tells_known_from_new_far_better_and_its_threshold_transfers(open_runs):
    from indivaid.inference import load_inference

    trained, untrained = open_runs["clipreid"], open_runs["zeroshot"]
    t, u = trained.test, untrained.test
    assert t["num_unknown_ids"] == 8 and t["num_known_ids"] == 32
    assert t["GM"] >= u["GM"] + 0.1 and t["GM"] >= 1.8 * u["GM"], (t["GM"], u["GM"])
    assert t["GM_oracle"] - t["GM"] <= ORACLE_MARGIN, (t["GM"], t["GM_oracle"])
    assert t["GM"] == pytest.approx(math.sqrt(t["BAKS"] * t["BAUS"])) and t["AUROC"] > u["AUROC"]
    # the threshold in model.pt is the validation one, with its curve; test never chose it
    model = load_inference(trained.checkpoint)
    cal = model.calibration
    assert cal is not None and cal.threshold == t["threshold"] == trained.val["threshold"]
    assert float(cal.curve.GM.nan_to_num(-1).max()) == pytest.approx(trained.val["GM"]) == pytest.approx(cal.val.GM)
    assert cal.probability is not None and cal.probability[1] <= 0  # farther: never more likely the same one
    # calibration never saw an individual the model trained on
    split = read_split(Path(trained.workdir) / "split.csv")
    val_ids = set(pl.concat(split.query_gallery("val"))["identity"].to_list())
    assert split.open_set and not val_ids & set(model.identities)


@pytest.fixture(scope="module")
def catalogue(open_runs, tmp_path_factory: pytest.TempPathFactory):
    """The test split as a user has it: known individuals' gallery photos (two sites), and new
    photos of known and never-seen individuals, one folder each."""
    work = tmp_path_factory.mktemp("match")
    split = read_split(Path(open_runs["clipreid"].workdir) / "split.csv")
    gallery, query = split.part("gallery"), split.part("query")
    known = sorted(gallery["identity"].unique().to_list())
    rows = []
    for r in gallery.iter_rows(named=True):
        dst = work / "gallery" / r["identity"] / Path(r["path"]).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(r["path"], dst)
        rows.append({"path": str(dst.relative_to(work)), "identity": r["identity"],
                     "site": "north" if known.index(r["identity"]) % 2 else "south"})
    pl.DataFrame(rows).write_csv(work / "catalogue.csv")
    photos = query.group_by("identity", maintain_order=True).head(2)  # two new photos per individual
    for r in photos.iter_rows(named=True):
        dst = work / "new" / r["identity"] / Path(r["path"]).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(r["path"], dst)
    parquet = work / "catalogue.parquet"
    ckpt = open_runs["clipreid"].checkpoint
    assert main(["embed", "--checkpoint", ckpt, "--table", str(work / "catalogue.csv"), "--out", str(parquet)]) == 0
    return work, ckpt, parquet, set(known), split.unknown_identities("test")


def test_match_decides_known_or_new_per_photo_at_the_calibrated_threshold(catalogue, capsys):
    from indivaid.inference import load_inference

    work, ckpt, parquet, known, unknown = catalogue
    table = pl.read_parquet(parquet)
    assert table.schema["embedding"] == pl.Array(pl.Float32, 96) and set(table["site"]) == {"north", "south"}
    capsys.readouterr()
    out = work / "matches.csv"
    assert main(["match", "--checkpoint", ckpt, "--gallery", str(parquet), "--images", str(work / "new"),
                 "--top-k", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    m = pl.read_csv(out)
    threshold = load_inference(ckpt).calibration.threshold
    firsts = m.filter(pl.col("rank") == 1)
    assert firsts.height == len(list((work / "new").rglob("*.jpg")))
    assert set(firsts["photo_identity"]) == known | set(unknown)  # new photos of known and of new individuals
    assert (m.group_by("photo").len()["len"] == 3).all()  # individuals, not images: 3 distinct per photo
    assert m.group_by("photo").agg(pl.col("identity").n_unique())["identity"].min() == 3
    # the decision is exactly "nearest individual within the calibrated threshold"
    want = ["KNOWN" if d <= threshold else "NEW" for d in firsts["best_distance"]]
    assert firsts["decision"].to_list() == want and set(want) == {"KNOWN", "NEW"}
    kn = firsts.filter(pl.col("decision") == "KNOWN")
    assert kn["identity_decided"].to_list() == kn["identity"].to_list()
    assert firsts.filter(pl.col("decision") == "NEW")["identity_decided"].null_count() == firsts.height - kn.height
    assert ((firsts["confidence"] >= 0) & (firsts["confidence"] <= 1)).all()
    assert (firsts["threshold"] == threshold).all()
    # the distances are those of the model's own embeddings (best <= mean; recomputed here)
    model = load_inference(ckpt)
    photo = firsts["photo"][0]
    q = torch.nn.functional.normalize(model.embed_files([photo]), dim=1)
    g = torch.from_numpy(np.asarray(table["embedding"].to_list(), dtype=np.float32))
    d = torch.cdist(q, g)[0]
    assert firsts["best_distance"][0] == pytest.approx(float(d.min()), abs=1e-4)
    assert (m["best_distance"] <= m["mean_distance"] + 1e-9).all()
    # each photo prints its decision, and a summary
    assert f"{kn.height} KNOWN, {firsts.height - kn.height} NEW" in printed and "NEW" in printed
    assert f"KNOWN {kn['identity_decided'][0]}" in printed


def test_match_threshold_override_where_parquet_and_grid(catalogue, capsys, tmp_path: Path):
    from PIL import Image

    from indivaid.cli import _photo

    work, ckpt, parquet, known, _ = catalogue
    base = ["match", "--checkpoint", ckpt, "--gallery", str(parquet), "--images", str(work / "new"), "--top-k", "2"]
    for threshold, decision in (("-1", "NEW"), ("10", "KNOWN")):
        out = tmp_path / f"t{threshold}.parquet"
        assert main(base + ["--threshold", threshold, "--out", str(out)]) == 0
        assert set(pl.read_parquet(out)["decision"]) == {decision}
    out = tmp_path / "north.csv"
    assert main(base + ["--where", "site=north", "--out", str(out)]) == 0
    north = set(pl.read_csv(work / "catalogue.csv").filter(pl.col("site") == "north")["identity"])
    assert set(pl.read_csv(out)["identity"]) <= north
    capsys.readouterr()
    assert main(base + ["--where", "region=x"]) == 2
    assert "no column 'region'; its metadata columns: site" in capsys.readouterr().err
    assert main(base + ["--where", "site=east"]) == 2
    assert "values of site: ['north', 'south']" in capsys.readouterr().err
    grid = tmp_path / "grid.png"
    assert main(base[:-2] + ["--top-k", "2", "--grid", str(grid)]) == 0
    with Image.open(grid) as img:
        assert img.format == "PNG" and img.height > img.width  # one row per photo
    # the grid shows original photos, their aspect kept (not the stretched model input)
    wide = write_image(tmp_path / "wide.jpg", size=(400, 100))
    assert _photo(str(wide)).shape[:2] == (80, 320)


def test_evaluate_reports_open_set_scores_at_the_calibrated_threshold(open_runs, capsys):
    import json

    res = open_runs["clipreid"]
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", res.checkpoint, "--split", "test"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("BAKS", "BAUS", "GM", "AUROC", "threshold", "mAP"):
        assert out[key] == pytest.approx(res.test[key], abs=1e-4), key
