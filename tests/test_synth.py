"""The synthetic dataset generator: determinism, layout, reuse and safe concurrent writing."""

from __future__ import annotations

import csv
import dataclasses
import json
import multiprocessing as mp
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indivaid.data import synth
from indivaid.data.synth import METADATA_COLUMNS, SynthParams, dataset_dir_name, generate

SMALL = SynthParams(identities=10, min_images=2, max_images=6, height=36, width=56, seed=3)


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "metadata.csv", newline="") as f:
        return list(csv.DictReader(f))


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    return {r["path"]: np.asarray(Image.open(folder / r["path"])) for r in _rows(folder)}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(SMALL, tmp_path_factory.mktemp("a"))


def test_deterministic(small: Path, tmp_path: Path) -> None:
    again = generate(SMALL, tmp_path / "b")
    assert again.name == small.name
    assert (again / "metadata.csv").read_bytes() == (small / "metadata.csv").read_bytes()
    assert (again / "params.json").read_bytes() == (small / "params.json").read_bytes()
    a, b = _pixels(small), _pixels(again)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_worker_count_does_not_change_output(small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synth, "_MIN_IMAGES_FOR_POOL", 0)  # force the process pool on a small set
    pooled = generate(SMALL, tmp_path, workers=2)
    a, b = _pixels(small), _pixels(pooled)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_other_seed_differs(small: Path, tmp_path: Path) -> None:
    other = generate(dataclasses.replace(SMALL, seed=4), tmp_path)
    assert other.name != small.name
    a, b = _pixels(small), _pixels(other)
    common = a.keys() & b.keys()
    assert common and not any(np.array_equal(a[k], b[k]) for k in common)


def test_dir_name_depends_on_params_and_version(monkeypatch: pytest.MonkeyPatch) -> None:
    name = dataset_dir_name(SMALL)
    assert name.startswith("Synthetic-") and len(name) == len("Synthetic-") + 12
    assert dataset_dir_name(dataclasses.replace(SMALL, identities=13)) != name
    assert dataset_dir_name(dataclasses.replace(SMALL, species="zebra")) != name
    assert dataset_dir_name(SynthParams(**dataclasses.asdict(SMALL))) == name
    monkeypatch.setattr(synth, "GENERATOR_VERSION", synth.GENERATOR_VERSION + "-test")
    assert dataset_dir_name(SMALL) != name


def test_reuse_does_not_rewrite(small: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sentinel = small / "sentinel"
    sentinel.write_text("kept")
    before = (small / "metadata.csv").stat().st_mtime_ns

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("should have reused the folder")

    monkeypatch.setattr(synth, "_write_dataset", fail)
    assert generate(SMALL, small.parent) == small
    assert sentinel.read_text() == "kept"
    assert (small / "metadata.csv").stat().st_mtime_ns == before


def test_metadata_layout(small: Path) -> None:
    with open(small / "metadata.csv", newline="") as f:
        assert tuple(next(csv.reader(f))) == METADATA_COLUMNS
    rows = _rows(small)
    assert len({r["image_id"] for r in rows}) == len(rows)
    assert len({r["identity"] for r in rows}) == SMALL.identities
    for r in rows:
        assert r["path"] == f"images/{r['identity']}/{r['image_id']}.jpg"
        with Image.open(small / r["path"]) as im:
            assert im.size == (SMALL.width, SMALL.height) and im.mode == "RGB"
        assert r["species"] == SMALL.species
        assert r["camera"] in {f"cam{c}" for c in range(SMALL.cameras)}
    by_identity: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        by_identity[r["identity"]].append(r)
    for group in by_identity.values():
        assert SMALL.min_images <= len(group) <= SMALL.max_images
        if len(group) >= 2:
            assert len({r["camera"] for r in group}) >= 2
            assert len({r["encounter"] for r in group}) >= 2
    encounters: dict[str, set[tuple[str, str, str]]] = defaultdict(set)
    for r in rows:
        encounters[r["encounter"]].add((r["identity"], r["camera"], r["date"]))
    assert all(len(v) == 1 for v in encounters.values())  # one identity, camera and date each
    info = json.loads((small / "params.json").read_text())
    assert info["params"] == dataclasses.asdict(SMALL)
    assert info["generator_version"] == synth.GENERATOR_VERSION
    assert info["counts"]["images"] == len(rows)
    assert info["name"] == small.name


def test_lookalikes_share_colours_with_parent() -> None:
    params = dataclasses.replace(SMALL, identities=20, lookalike_fraction=0.2)
    genomes, parents = synth._genomes(params)
    assert len(parents) == 4
    for child, parent in parents.items():
        assert child not in parents.values()
        assert genomes[child].pattern == genomes[parent].pattern
        assert np.abs(genomes[child].base - genomes[parent].base).max() < 0.2


def test_no_temp_dirs_left(small: Path) -> None:
    assert not [p for p in small.parent.iterdir() if ".tmp-" in p.name]


def test_failed_generation_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(params: SynthParams, folder: Path, workers: int) -> None:
        (folder / "images").mkdir(parents=True)
        raise RuntimeError("boom")

    monkeypatch.setattr(synth, "_write_dataset", boom)
    with pytest.raises(RuntimeError):
        generate(SMALL, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [f".{dataset_dir_name(SMALL)}.lock"]


def _generate_in_child(root: str) -> str:
    return str(generate(SMALL, root))


def test_concurrent_generation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Forked children inherit the patch: pool workers are daemonic and must render inline.
    monkeypatch.setattr(synth, "_MIN_IMAGES_FOR_POOL", 0)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(2) as pool:
        paths = pool.map(_generate_in_child, [str(tmp_path)] * 2)
    assert paths[0] == paths[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([Path(paths[0]).name, f".{Path(paths[0]).name}.lock"])
    rows = _rows(Path(paths[0]))
    assert len(rows) == sum(1 for _ in (Path(paths[0]) / "images").rglob("*.jpg"))


def test_invalid_params() -> None:
    with pytest.raises(ValueError):
        SynthParams(min_images=5, max_images=4)
    with pytest.raises(ValueError):
        SynthParams(start_date="not a date")


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--out", str(tmp_path), "--identities", "3", "--height", "32", "--width", "48", "--seed", "1"]
    assert synth.main(args) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.parent == tmp_path and (path / "metadata.csv").is_file()
    assert len({r["identity"] for r in _rows(path)}) == 3


def test_field_grid_matches_pointwise() -> None:
    """The separable (matmul) evaluation used for speed equals the direct sum of cosines."""
    field = synth._random_field(np.random.default_rng(0), 12, 1.0, 3.0)
    xs, ys = np.arange(20, 60, dtype=np.float32), np.arange(10, 40, dtype=np.float32)
    affine = (0.03, 0.01, -1.2, -0.01, 0.03, -0.5)
    px, py = np.meshgrid(xs, ys)
    x, y = affine[0] * px + affine[1] * py + affine[2], affine[3] * px + affine[4] * py + affine[5]
    np.testing.assert_allclose(field.grid(xs, ys, affine), field(x, y), atol=1e-4)


def test_render_image_preview() -> None:
    pixels = synth.render_image(SMALL, identity=1, index=0)
    assert pixels.shape == (SMALL.height, SMALL.width, 3) and pixels.dtype == np.uint8
    assert pixels.std() > 5  # not a blank frame
