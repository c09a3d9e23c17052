from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from indivaid.config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from indivaid.registry import Registry


@dataclass(frozen=True)
class Inner:
    lr: float = field(default=1e-3, metadata={"gt": 0})
    mode: Literal["mean", "attention"] = "mean"


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner = Inner()
    sizes: tuple[int, int] = (256, 128)
    tags: list[str] = field(default_factory=list)
    seed: int | None = None


def test_from_dict_builds_nested_typed_frozen_config():
    cfg = from_dict(Outer, {"name": "x", "inner": {"lr": "1e-4", "mode": "attention"}, "sizes": [64, 32]})
    assert cfg.inner.lr == pytest.approx(1e-4) and cfg.inner.mode == "attention" and cfg.sizes == (64, 32)
    with pytest.raises(Exception):
        cfg.name = "y"  # frozen
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "x", "inner": {"lrr": 1}}, "inner.lrr: unknown key (did you mean 'lr'?)"),
        ({"name": "x", "inner": {"lr": -1.0}}, "inner.lr: must be > 0"),
        ({"name": "x", "inner": {"mode": "attn"}}, "inner.mode: 'attn' is not one of"),
        ({"name": "x", "sizes": [1, 2, 3]}, "sizes: expected 2 items"),
        ({"name": "x", "seed": "abc"}, "seed: "),
        ({"name": 3}, "name: expected a string"),
        ({}, "name: required key is missing"),
    ],
)
def test_bad_values_name_the_dotted_path(data, message):
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, data)
    assert message in str(e.value)


def test_load_yaml_prefixes_file_and_applies_overrides(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("name: a\ninner:\n  lr: 0.1\n")
    cfg = load_yaml(Outer, f, ["inner.mode=attention", "seed=4"])
    assert (cfg.inner.mode, cfg.seed, cfg.inner.lr) == ("attention", 4, 0.1)
    f.write_text("name: a\ninnner: {}\n")
    with pytest.raises(ConfigError, match=r"c.yaml: innner: unknown key \(did you mean 'inner'\?\)"):
        load_yaml(Outer, f)
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(Outer, tmp_path / "missing.yaml")
    assert apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]"]) == {"a": {"b": 1, "c": [1, 2]}}


def test_registry_lookup_and_did_you_mean():
    reg: Registry[int] = Registry("thing")
    reg.register("Alpha", 1)
    reg.register("beta", 2)
    assert reg.get("alpha") == 1 and "BETA" in reg and reg.names() == ["alpha", "beta"]
    with pytest.raises(KeyError, match="unknown thing 'alpah' \\(did you mean 'alpha'\\?\\)"):
        reg.get("alpah")
    with pytest.raises(ValueError, match="twice"):
        reg.register("alpha", 3)
