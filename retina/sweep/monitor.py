"""Driver-side Tune callbacks: keep MLflow truthful and show the sweep's progress.

A trial stopped by ASHA, killed by an interrupt or crashed in its worker cannot finish
its own MLflow run. ``RunFinisher`` does it from the driver, which sees every trial's
end. ``ProgressLog`` keeps a compact table of every trial for the console.
"""

import logging
import time
from dataclasses import dataclass, field

from mlflow.tracking import MlflowClient
from ray.tune import Callback
from ray.tune.experiment import Trial

from retina.config import TrialSettings
from retina.tracking import find_trial_run, finish_if_running

log = logging.getLogger(__name__)


class RunFinisher(Callback):
    """Give every trial's MLflow run a final status that says what happened to it.

    Tune pickles its callbacks with the sweep's state, so the MLflow client is made on
    first use rather than held: a resumed sweep gets a fresh one.
    """

    def __init__(self, tracking_uri: str, experiment_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self._client: MlflowClient | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _run_of(self, trial: Trial) -> str | None:
        run_id = (trial.last_result or {}).get("mlflow_run_id")
        return run_id or find_trial_run(self.client, self.experiment_id, trial.trial_id)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        run_id = self._run_of(trial)
        if run_id and finish_if_running(self.client, run_id, "stopped_early"):
            log.info("trial %s stopped early by the scheduler", trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        run_id = self._run_of(trial)
        if run_id:
            reason = str(trial.error_file or "trial raised an error")
            finish_if_running(self.client, run_id, "failed", reason)


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@dataclass
class TrialRow:
    name: str
    status: str = "PENDING"
    epoch: int = 0
    val_f1: float | None = None
    best_val_f1: float | None = None
    outcome: str = ""
    settings: TrialSettings | None = None
    started: float = field(default_factory=time.monotonic)


class ProgressLog(Callback):
    """Logs trial starts and ends, and every half minute where each running trial is."""

    def __init__(self, log_every_seconds: float = 30.0) -> None:
        self.rows: dict[str, TrialRow] = {}
        self.log_every_seconds = log_every_seconds
        self._last_log = 0.0

    def _row(self, trial: Trial) -> TrialRow:
        if trial.trial_id not in self.rows:
            settings = TrialSettings.model_validate(trial.config)
            self.rows[trial.trial_id] = TrialRow(settings.run_name(), settings=settings)
        return self.rows[trial.trial_id]

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        row = self._row(trial)
        row.status = "RUNNING"
        log.info("started %s", row.name)

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info
    ) -> None:
        row = self._row(trial)
        row.status = "RUNNING"
        if "epoch" in result:
            row.epoch = result["epoch"]
            row.val_f1 = result["val_f1"]
        else:
            row.status = "FINAL"
        row.best_val_f1 = result.get("best_val_f1", row.best_val_f1)
        row.outcome = result.get("outcome", row.outcome)
        if time.monotonic() - self._last_log > self.log_every_seconds:
            self._last_log = time.monotonic()
            running = [r for r in self.rows.values() if r.status == "RUNNING"]
            done = sum(r.status in ("DONE", "ERROR") for r in self.rows.values())
            log.info(
                "%d trials done, %d running: %s",
                done,
                len(running),
                "; ".join(f"{r.name} epoch {r.epoch} val F1 {_score(r.val_f1)}" for r in running),
            )

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        row = self._row(trial)
        row.status = "DONE"
        row.outcome = row.outcome or "stopped_early"
        log.info("%s: %s, best val F1 %s", row.name, row.outcome, _score(row.best_val_f1))

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        row = self._row(trial)
        row.status = "ERROR"
        row.outcome = "failed"
        log.warning("%s failed; see %s", row.name, trial.error_file)
