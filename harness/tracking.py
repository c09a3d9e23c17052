"""Experiment tracking with MLflow, the way Ray users already do it.

Ray Tune's ``MLflowLoggerCallback`` runs where ``Tuner.fit`` runs and makes one MLflow run per
trial, tagged with the trial's name: its searched parameters and every per-epoch report as
metrics. The trial itself adds its final ``model.pt`` to that run as an artefact (the callback's
own artefact upload would send the Tune process's staging folder, not the model). Tracking never
fails a trial or a search: a tracking error is a warning.

Imported only when a sweep file has a ``tracking.mlflow`` section: it imports MLflow.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.air.integrations.mlflow import MLflowLoggerCallback

from harness.config import MlflowConfig, SweepConfig

if TYPE_CHECKING:
    from harness.plan import Experiment

log = logging.getLogger(__name__)


def experiment_name(sweep: SweepConfig) -> str:
    """The MLflow experiment of a sweep's runs: ``tracking.mlflow.experiment``, else the sweep's name."""
    assert sweep.tracking.mlflow is not None
    return sweep.tracking.mlflow.experiment or sweep.name


def prepare_experiment(sweep: SweepConfig) -> str | None:
    """Create the sweep's MLflow experiment (with ``artifact_location`` when given) before any
    trial starts, in the driver, so every Tune process and trial finds the same one; returns its id."""
    cfg = sweep.tracking.mlflow
    if cfg is None:
        return None
    from mlflow import MlflowClient

    client = MlflowClient(cfg.tracking_uri)
    name = experiment_name(sweep)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(name, artifact_location=cfg.artifact_location)


class TrackingCallback(MLflowLoggerCallback):
    """Ray's MLflowLoggerCallback (a run per trial: its parameters and every report), except that
    a tracking failure is logged instead of failing the search."""

    def _quietly(self, what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as e:
            log.warning("MLflow: %s failed (%s); the search goes on", what, e)

    def setup(self, *args: Any, **kwargs: Any) -> None:
        self._trial_runs = {}
        self._quietly("setting up", lambda: super(TrackingCallback, self).setup(*args, **kwargs))

    def log_trial_start(self, trial: Any) -> None:
        self._quietly(f"starting the run of {trial}", lambda: super(TrackingCallback, self).log_trial_start(trial))

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        if trial in self._trial_runs:
            self._quietly(f"logging a result of {trial}",
                          lambda: super(TrackingCallback, self).log_trial_result(iteration, trial, result))

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        if trial in self._trial_runs:
            self._quietly(f"ending the run of {trial}",
                          lambda: super(TrackingCallback, self).log_trial_end(trial, failed))


def mlflow_callback(sweep: SweepConfig, exp: Experiment) -> TrackingCallback:
    """The callback of one Tune experiment; its runs are tagged with the sweep, dataset, method and
    phase (the searched parameters are the run's params; a final run's is its seed)."""
    cfg = sweep.tracking.mlflow
    assert cfg is not None
    return TrackingCallback(tracking_uri=cfg.tracking_uri, experiment_name=experiment_name(sweep),
                            tags={"sweep": sweep.name, "dataset": exp.dataset, "method": exp.method,
                                  "phase": exp.phase})


def log_model(cfg: MlflowConfig, experiment: str, trial_name: str, model: Path, wait_s: float = 30.0) -> str | None:
    """Add the trial's ``model.pt`` to the MLflow run that the callback made for it (the run tagged
    ``trial_name``: the latest, if a resumed sweep made another); returns the run id, or None
    (logged) when there is no such run or the server cannot be reached."""
    if not cfg.log_model or not model.is_file():
        return None
    try:
        from mlflow import MlflowClient

        client = MlflowClient(cfg.tracking_uri)
        deadline = time.time() + wait_s
        while True:  # the callback starts the run when Tune starts the trial, in another process
            exp = client.get_experiment_by_name(experiment)
            runs = client.search_runs([exp.experiment_id], filter_string=f"tags.trial_name = '{trial_name}'",
                                      order_by=["attributes.start_time DESC"], max_results=1) if exp else []
            if runs or time.time() > deadline:
                break
            time.sleep(1.0)
        if not runs:
            log.warning("MLflow: no run tagged trial_name=%s in experiment %r; model.pt not logged", trial_name,
                        experiment)
            return None
        client.log_artifact(runs[0].info.run_id, str(model))
        return runs[0].info.run_id
    except Exception as e:
        log.warning("MLflow: could not log %s (%s); the trial goes on", model, e)
        return None
