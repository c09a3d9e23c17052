"""Sweep files: YAML -> typed frozen config, validated against the trainer's config when loaded.

Every search-space key is a dotted trainer path (``stage1.lr``); the file fails to load, with the
key's path and a did-you-mean, if a path or a range is wrong, so nothing starts on a typo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from indivaid.config import ConfigError, apply_overrides, from_dict, read_mapping, to_dict
from indivaid.data.adapters import DATASETS
from indivaid.methods import METHODS, MethodSpec
from indivaid.models.fusion import fusion_reads
from indivaid.registry import did_you_mean
from indivaid.training.config import TrainConfig, merge, resolve
from indivaid.utils.io import data_root as default_data_root

if TYPE_CHECKING:
    from harness.storage import Storage


@dataclass(frozen=True)
class ParamSpec:
    """One search dimension: loguniform/uniform (low, high), int (low, high), choice (values: one
    sampled per trial) or grid (values: every one gets a trial, Tune's grid search).

    A choice or grid over a *section* (``model``) takes mappings as values, each setting several
    keys at once: ``{backbone: ViT-L-14, pretrained: openai}``. That is how backbones and their
    weights are searched, since not every weights tag fits every backbone. Tune and Optuna see such
    a value as its label (``backbone=ViT-L-14, pretrained=openai``), which the results record.
    """

    kind: Literal["loguniform", "uniform", "int", "choice", "grid"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    def __post_init__(self) -> None:
        if self.kind in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"{self.kind} needs a non-empty 'values' list")
            joint = [isinstance(v, dict) for v in self.values]
            if any(joint) and not all(joint):
                raise ValueError("either every value is a mapping (several keys set together) or none is")
            if any(joint) and not all(self.values):
                raise ValueError("an empty mapping among the values sets nothing")
            labels = self.labels()
            if len(set(labels)) != len(labels):
                raise ValueError(f"duplicate values ({', '.join(sorted({x for x in labels if labels.count(x) > 1}))})")
            return
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"{self.kind} needs low < high, got low={self.low}, high={self.high}")
        if self.kind == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.low}")
        if self.kind == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError("int bounds must be whole numbers")

    @property
    def discrete(self) -> bool:
        return self.kind in ("choice", "grid")

    @property
    def joint(self) -> bool:
        """Whether each value is a mapping of keys set together."""
        return self.discrete and isinstance((self.values or [None])[0], dict)

    def labels(self) -> list[Any]:
        """What Tune and Optuna see of each value: the value, or a joint value's label."""
        return [value_label(v) if isinstance(v, dict) else v for v in self.values or []]

    def decode(self, key: str, value: Any) -> dict[str, Any]:
        """A sampled value of this dimension as dotted trainer keys: a joint label becomes its
        keys (``model.backbone``, ...); a mapping (as best.yaml may hold) is taken as it is."""
        if not self.joint:
            return {key: value}
        if not isinstance(value, dict):
            by_label = dict(zip(self.labels(), self.values or []))
            if value not in by_label:
                raise ConfigError(f"search_space.{key}: {value!r} is none of its values ({', '.join(by_label)})")
            value = by_label[value]
        return {f"{key}.{k}": v for k, v in value.items()}

    def samples(self) -> list[Any]:
        """Representative values (both ends, the middle) used to validate the key against the trainer."""
        if self.discrete:
            return self.labels()
        assert self.low is not None and self.high is not None
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        mid = math.sqrt(self.low * self.high) if self.kind == "loguniform" else (self.low + self.high) / 2
        return [self.low, mid, self.high]


def value_label(value: dict[str, Any]) -> str:
    """``{backbone: ViT-L-14, pretrained: openai}`` -> ``backbone=ViT-L-14, pretrained=openai``."""
    return ", ".join(f"{k}={v}" for k, v in value.items())


def trainer_params(space: dict[str, ParamSpec], params: dict[str, Any]) -> dict[str, Any]:
    """A trial's sampled values as dotted trainer keys (joint values expanded; other keys as given)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        out.update(space[key].decode(key, value) if key in space else {key: value})
    return out


@dataclass(frozen=True)
class SearchConfig:
    seed: int = 0
    startup_trials: int = field(default=4, metadata={"ge": 0})  # random trials before TPE
    num_samples: int = field(default=8, metadata={"ge": 1})  # per dataset x method
    max_concurrent: int = field(default=2, metadata={"ge": 1})  # trials at once per dataset x method
    max_concurrent_experiments: int = field(default=1, metadata={"ge": 1})  # dataset x method searches at once
    metric: Literal["val_mAP", "val_rank1"] = "val_mAP"


@dataclass(frozen=True)
class SchedulerConfig:
    kind: Literal["asha", "none"] = "asha"
    grace_period: int = field(default=10, metadata={"ge": 1})  # stage-2 epochs; >= the stage-2 warm-up
    reduction_factor: int = field(default=2, metadata={"ge": 2})


@dataclass(frozen=True)
class ResourcesConfig:
    cpus: float = field(default=1.0, metadata={"gt": 0})
    gpus: float = field(default=0.0, metadata={"ge": 0})  # a fraction of one (0.5: two trials share a GPU) or whole GPUs
    custom: dict[str, float] = field(default_factory=dict)
    workers: int = field(default=0, metadata={"ge": 0})  # 0 or 1: train inside the trial; >= 2: Ray Train (DDP)
    use_gpu: bool = False

    @property
    def ray_train(self) -> bool:
        """The trial drives a Ray Train run (DDP workers hold the resources) instead of training itself."""
        return self.workers > 1


@dataclass(frozen=True)
class CheckpointPolicy:
    """When GPU trials write resumable state, from their estimated length (harness.estimate):
    none for runs shorter than ``min_run_minutes`` (a crash costs less than the writes), else about
    every ``every_minutes``. Trials without a GPU estimate keep their config's ``checkpoint.every``."""

    enabled: bool = True
    min_run_minutes: float = field(default=10.0, metadata={"ge": 0})
    every_minutes: float = field(default=15.0, metadata={"gt": 0})


@dataclass(frozen=True)
class MlflowConfig:
    """MLflow tracking of every trial: Ray Tune's MLflowLoggerCallback records each trial as a run
    (its searched parameters and every per-epoch report), and the trial itself adds its final
    ``model.pt`` to the same run as an artefact (the callback's own artefact upload would send the
    Tune process's staging folder, not the model)."""

    tracking_uri: str  # http://HOST:5000 (mlflow server), sqlite:///abs/path/mlflow.db, databricks, ...
    experiment: str | None = None  # default: the sweep's name
    artifact_location: str | None = None  # where a new experiment keeps artefacts (default: the tracking store's)
    log_model: bool = True  # the trial logs its final model.pt as an artefact


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking beside Tune's own TensorBoard files (``tensorboard --logdir <storage>``)."""

    mlflow: MlflowConfig | None = None


@dataclass(frozen=True)
class ClusterConfig:
    """How the sweep uses a Ray cluster.

    ``coordinator_resource``: the custom resource of the nodes that may run coordinators (the
    tasks that drive the searches and the trials that only drive a Ray Train run); a cluster that
    declares none runs them on the head node, where the driver runs, so that losing a GPU or spot
    node never ends a search. ``runtime_env``: Ray's runtime environment for the sweep's job, for
    clusters whose nodes do not have this package installed (``working_dir`` or ``py_modules``)."""

    coordinator_resource: str = "coordinator"
    runtime_env: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FinalConfig:
    seeds: int = field(default=5, metadata={"ge": 0})  # re-runs of each best config, scored on test
    dataset_seeds: dict[str, int] = field(default_factory=dict)  # per-dataset override of seeds
    # The paper's protocol: closed-set final runs train on train + validation identities (the search
    # fixed the config and epochs; test stays untouched). Open-set splits keep validation held out,
    # since the KNOWN/NEW threshold is calibrated on it. false: finals train on the train split only.
    train_on_val: bool = True
    # After training, score each final model on its test split with corrupted queries
    # (indivaid.eval.robustness): run/robustness.json, robust_* columns, the leaderboard's robustness table.
    robustness: bool = False

    def seeds_for(self, dataset: str) -> int:
        return int(self.dataset_seeds.get(dataset, self.seeds))


@dataclass(frozen=True)
class SweepConfig:
    name: str
    datasets: list[str]
    methods: list[str] = field(default_factory=lambda: ["indivaid", "clipreid", "zeroshot"])
    storage: str | None = None  # default results/<name>; a local path or a URI (s3://, gs://, file://)
    cache_dir: str | None = None  # image/feature caches, a file path: default <storage>/cache, or for a URI storage
    #                               ~/.cache/indivaid/sweeps/<name> on each node
    data_root: str | None = None  # default $INDIVAID_DATA, then data/
    base: dict[str, Any] = field(default_factory=dict)  # trainer config (may name a preset)
    per_dataset: dict[str, dict[str, Any]] = field(default_factory=dict)  # trainer overrides per dataset
    search_space: dict[str, ParamSpec] = field(default_factory=dict)
    search: SearchConfig = SearchConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    resources: ResourcesConfig = ResourcesConfig()
    dataset_resources: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-dataset overrides of resources
    final: FinalConfig = FinalConfig()
    max_failures: int = field(default=1, metadata={"ge": 0})  # Tune restarts of a failed trial (the only retry layer)
    trial_timeout_minutes: float | None = field(default=None, metadata={"gt": 0})  # a longer trial is stopped: `timeout`
    checkpoint_policy: CheckpointPolicy = CheckpointPolicy()
    tracking: TrackingConfig = TrackingConfig()
    cluster: ClusterConfig = ClusterConfig()
    rehearsal: bool = False  # set by --rehearse: results are labelled and never mixed with real ones
    # Trainer values applied after the searched ones (set by --rehearse: the tiny model, whatever
    # model.* a trial searched, so the search dimension still runs through every code path).
    pinned: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ValueError("datasets: name at least one dataset")
        for i, d in enumerate(self.datasets):
            if d not in DATASETS:
                raise ValueError(f"datasets[{i}]: unknown dataset {d!r}{did_you_mean(d, DATASETS.names())}")
        for i, m in enumerate(self.methods):
            if m not in METHODS:
                raise ValueError(f"methods[{i}]: unknown method {m!r}{did_you_mean(m, METHODS.names())}")
        for section in ("per_dataset", "dataset_resources"):
            for d in getattr(self, section):
                if d not in self.datasets:
                    raise ValueError(f"{section}.{d}: not one of the sweep's datasets {self.datasets}"
                                     f"{did_you_mean(d, self.datasets)}")
        for d in self.dataset_resources:
            self.resources_for(d)  # validates the override's keys and values now
        grids = [k for k, p in self.search_space.items() if p.kind == "grid"]
        sampled = [k for k, p in self.search_space.items() if p.kind != "grid"]
        if grids and sampled:
            raise ValueError(f"search_space: grid keys ({', '.join(grids)}) cannot be mixed with sampled keys "
                             f"({', '.join(sampled)}): Optuna samples, it does not enumerate. Make the grid a "
                             f"choice (searched by TPE), or run one sweep per grid value")

    def resources_for(self, dataset: str, method: str | None = None) -> ResourcesConfig:
        """The trial resources of one dataset: ``resources`` with its ``dataset_resources`` entry on top.

        With ``method``: a method that does not train (zero-shot) runs as one worker, since it only
        evaluates and evaluation runs on rank 0: more DDP workers would hold GPUs and do nothing.
        Without it: what the dataset's trained methods get (the most a trial of it can hold)."""
        res = self.resources
        over = self.dataset_resources.get(dataset)
        if over:
            try:
                res = from_dict(ResourcesConfig, {**to_dict(self.resources), **over})
            except ConfigError as e:
                raise ValueError(f"dataset_resources.{dataset}.{e}") from None
        if method is not None and res.ray_train and not METHODS.get(method).train:
            res = replace(res, workers=1)
        return res

    @property
    def storage_uri(self) -> str:
        """Where the results go: an absolute local path, or the URI as given."""
        from harness.storage import normalize

        return normalize(self.storage or f"results/{self.name}")

    @property
    def store(self) -> Storage:
        """The results storage (harness.storage): every result is read and written through it."""
        from harness.storage import open_storage

        return open_storage(self.storage_uri)

    @property
    def storage_path(self) -> Path:
        """The results folder of a sweep whose storage is a local path (or ``file://``)."""
        return self.store.local_path()

    @property
    def cache_path(self) -> Path:
        """The image and frozen-feature caches: a file path on every node (caches are memory-mapped
        and locked, which object stores cannot do). Beside the results on a local storage; else in
        each node's ``~/.cache`` (one build per node), unless ``cache_dir`` names a shared folder."""
        if self.cache_dir:
            return Path(self.cache_dir).expanduser().resolve()
        if self.store.local:
            return self.storage_path / "cache"
        return Path("~/.cache/indivaid/sweeps").expanduser() / self.name

    @property
    def data_path(self) -> Path:
        return default_data_root(self.data_root)


def applies(key: str, method: MethodSpec) -> bool:
    """Whether a searched trainer key changes anything for ``method`` (else it is dropped)."""
    section = key.split(".")[0]
    if not method.train:
        return section in ("model", "data", "eval")
    if section == "fusion":
        return fusion_reads(method.fusion, key.split(".", 1)[-1])
    return True


def trial_config(sweep: SweepConfig, dataset: str, method: str, params: dict[str, Any], seed: int | None = None,
                 final: bool = False) -> TrainConfig:
    """The trainer config of one trial: base, dataset, method, searched values, seed; for a final run
    (``final``), training on train + validation identities where ``final.train_on_val`` applies."""
    data = {"dataset": dataset, "data_root": str(sweep.data_path), "cache_dir": str(sweep.cache_path)}
    base = merge(apply_overrides(sweep.base, []), sweep.per_dataset.get(dataset, {}))
    base = merge(base, {"data": data, "method": method})
    params = trainer_params(sweep.search_space, params)
    params.update(flat_keys(sweep.pinned))  # set by --rehearse: wins over searched values
    overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}" for k, v in params.items()]
    if seed is not None:
        overrides.append(f"runtime.seed={seed}")
    cfg = resolve(apply_overrides(base, overrides), f"{dataset}/{method}")
    if final and sweep.final.train_on_val and trains_on_val(cfg):
        cfg = resolve(apply_overrides(base, [*overrides, "data.train_on_val=true"]), f"{dataset}/{method}")
    return cfg


def flat_keys(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{model: {backbone: tiny}}`` -> ``{"model.backbone": "tiny"}``."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def trains_on_val(cfg: TrainConfig) -> bool:
    """Whether a final run of ``cfg`` may train on the validation identities: a trained method on a
    closed-set split built here (a given split file keeps its own validation role)."""
    return (METHODS.get(cfg.method).train and cfg.data.split.unknown_fraction == 0
            and cfg.data.split_file is None)


def load_sweep(file: str | Path) -> SweepConfig:
    """Load and validate a sweep file; every error starts with the file and the key path."""
    file = Path(file)
    raw = read_mapping(file)
    try:
        sweep = from_dict(SweepConfig, raw)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
    for key, spec in sweep.search_space.items():
        for value in spec.samples():
            try:
                trial_config(sweep, sweep.datasets[0], "indivaid", {key: value})
            except ConfigError as e:
                msg = str(e).split(": ", 1)[1] if ": " in str(e) else str(e)
                raise ConfigError(f"{file}: search_space.{key}: {msg}") from None
    return sweep  # harness.checks checks the plan of every dataset (--dry-run, and before a sweep starts)
