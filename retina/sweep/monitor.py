"""Driver-side Tune callbacks: keep MLflow truthful and show the sweep's progress.

A trial stopped by ASHA, killed by an interrupt or crashed in its worker cannot finish
its own MLflow run. ``RunFinisher`` does it from the driver, which sees every trial's
end. ``ProgressLog`` keeps a compact table of every trial for the console.
"""

import logging
import time
from dataclasses import dataclass

from mlflow.tracking import MlflowClient
from ray.tune import Callback
from ray.tune.experiment import Trial
from rich.console import Console
from rich.live import Live
from rich.table import Table

from retina.config import TrialSettings
from retina.figures import learning_curves_figure
from retina.tracking import RunRecorder, find_trial_run, finish_if_running

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
            self._log_learning_curves(run_id)

    def _log_learning_curves(self, run_id: str) -> None:
        """A stopped trial never reached its phase end: draw its curves from MLflow."""
        keys = ("train_loss", "val_loss", "val_f1", "val_auc")
        series = {
            key: {m.step: m.value for m in self.client.get_metric_history(run_id, key)}
            for key in keys
        }
        steps = sorted(series["val_f1"])
        if steps:
            history = [{key: series[key].get(step, float("nan")) for key in keys} for step in steps]
            RunRecorder(self.client, run_id).log_figure(
                learning_curves_figure(history), "learning_curves.png"
            )

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
    trial_id: str = ""
    status: str = "PENDING"
    epoch: int = 0
    val_f1: float | None = None
    best_val_f1: float | None = None
    outcome: str = ""
    settings: TrialSettings | None = None
    final_epoch: int = 0  # phase 2 (retrain or fine-tune): epochs done of final_epochs
    final_epochs: int = 0

    @property
    def state(self) -> str:
        """What the trial is doing, for the table and the log."""
        if self.outcome or self.status != "RUNNING":
            return self.outcome or self.status.lower()
        if self.final_epochs:
            return f"{self.settings.strategy} {self.final_epoch}/{self.final_epochs}"
        return "running"

    @property
    def summary(self) -> str:
        if self.final_epochs:
            return f"{self.name} {self.state}"
        return f"{self.name} epoch {self.epoch} val F1 {_score(self.val_f1)}"


class SweepProgress(Callback):
    """Shows where every trial is: a live table on a terminal, and log lines for trial
    starts and ends (plus, off a terminal, a line every half minute on running trials)."""

    def __init__(self, console: Console | None = None, log_every_seconds: float = 30.0) -> None:
        self.rows: dict[str, TrialRow] = {}
        self.log_every_seconds = log_every_seconds
        self._last_log = 0.0
        self.console = console if console is not None and console.is_terminal else None
        self._live: Live | None = None

    def __getstate__(self) -> dict:
        # Tune pickles callbacks with the sweep's state; a live display does not pickle.
        return {**self.__dict__, "console": None, "_live": None}

    def table(self) -> Table:
        table = Table(box=None, header_style="bold", pad_edge=False)
        for column in ("trial", "optimizer", "lr", "split", "strategy", "status"):
            table.add_column(column)
        for column in ("epoch", "val F1", "best val F1"):
            table.add_column(column, justify="right")
        for row in self.rows.values():
            settings = row.settings
            table.add_row(
                row.trial_id,
                settings.optimizer,
                f"{settings.learning_rate:.1e}",
                str(settings.split_seed),
                settings.strategy,
                row.state,
                str(row.epoch),
                _score(row.val_f1),
                _score(row.best_val_f1),
            )
        return table

    def _refresh(self) -> None:
        if self.console is None:
            return
        if self._live is None:
            self._live = Live(self.table(), console=self.console, refresh_per_second=2)
            self._live.start()
        else:
            self._live.update(self.table())

    def on_experiment_end(self, trials: list[Trial], **info) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _row(self, trial: Trial) -> TrialRow:
        if trial.trial_id not in self.rows:
            settings = TrialSettings.model_validate(trial.config)
            self.rows[trial.trial_id] = TrialRow(
                settings.run_name(), trial_id=trial.trial_id, settings=settings
            )
        return self.rows[trial.trial_id]

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        row = self._row(trial)
        row.status = "RUNNING"
        log.info("started %s", row.name)
        self._refresh()

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info
    ) -> None:
        row = self._row(trial)
        row.status = "RUNNING"
        if "epoch" in result:
            row.epoch = result["epoch"]
            row.val_f1 = result["val_f1"]
        elif "final_epoch" in result:
            row.final_epoch = result["final_epoch"]
            row.final_epochs = result["final_epochs"]
        else:
            row.status = "FINAL"
        row.best_val_f1 = result.get("best_val_f1", row.best_val_f1)
        row.outcome = result.get("outcome", row.outcome)
        self._refresh()
        if self.console is None and time.monotonic() - self._last_log > self.log_every_seconds:
            self._last_log = time.monotonic()
            running = [r for r in self.rows.values() if r.status == "RUNNING"]
            done = sum(r.status in ("DONE", "ERROR") for r in self.rows.values())
            log.info(
                "%d trials done, %d running: %s",
                done,
                len(running),
                "; ".join(r.summary for r in running),
            )

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        row = self._row(trial)
        row.status = "DONE"
        row.outcome = row.outcome or "stopped_early"
        log.info("%s: %s, best val F1 %s", row.name, row.outcome, _score(row.best_val_f1))
        self._refresh()

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        row = self._row(trial)
        row.status = "ERROR"
        row.outcome = "failed"
        log.warning("%s failed; see %s", row.name, trial.error_file)
        self._refresh()
