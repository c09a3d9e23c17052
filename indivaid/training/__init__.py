"""The two-stage trainer (no Ray): ``train(cfg, workdir=..., report=...)``.

Modules: ``config`` (TrainConfig), ``features`` (image and frozen-feature caches), ``run`` (one
run's shared state), ``stage1`` and ``stage2`` (the two stages), ``trainer`` (the entry point).
"""

from indivaid.training.config import TrainConfig, load_config, resolve
from indivaid.training.trainer import REPORT_KEYS, RunResult, TrainingError, train, warm_caches

__all__ = ["REPORT_KEYS", "RunResult", "TrainConfig", "TrainingError", "load_config", "resolve", "train", "warm_caches"]
