"""MLflow: where runs are stored, how a sweep and its trials are recorded, and their tags.

A sweep is one MLflow experiment holding a parent run for the sweep and one child run
per trial. Trials create and finish their own runs from wherever they execute; the
sweep's driver finishes any run a trial could not (stopped by the scheduler, crashed,
interrupted), so that no run stays RUNNING once a sweep has ended.
"""

import logging
import os
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from retina.errors import TrackingError

log = logging.getLogger(__name__)

# Tags that retina reads back; their values are plain strings.
TAG_ROLE = "retina.role"  # "sweep" for the parent run, "trial" for each child
TAG_TRIAL_ID = "retina.trial_id"  # Ray Tune's trial id, stable across resumes
TAG_OUTCOME = "retina.outcome"  # finished | stopped_early | failed | killed
TAG_FAILURE = "retina.failure"  # one line: why a trial failed
TAG_EVALUATED = "retina.evaluated"  # "true" once the test split was scored
TAG_NODE = (
    "retina.node_id"  # the Ray node a trial last ran on  # "true" once the test split was scored
)
TAG_PARENT = "mlflow.parentRunId"
MODEL_ARTIFACT = "model"


def project_store_dir() -> Path:
    """The local tracking store: ``mlflow/`` under the current folder."""
    return Path.cwd() / "mlflow"


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the SQLite store under ``mlflow/``."""
    configured = os.environ.get("MLFLOW_TRACKING_URI")
    if configured:
        return configured
    return f"sqlite:///{project_store_dir() / 'mlflow.db'}"


def is_local_uri(uri: str) -> bool:
    """Whether only this machine can reach the store (SQLite or a file path)."""
    return uri.startswith(("sqlite:", "file:", "/", ".")) or "://" not in uri


def connect(uri: str) -> MlflowClient:
    """A client for ``uri``, checked to answer now, before any trial depends on it."""
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if uri.startswith(("http://", "https://")):
        _probe_server(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as error:  # MLflow raises many kinds for a dead or wrong store
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise TrackingError(f"tracking store {uri} is unreachable: {reason}") from None
    return client


def _probe_server(uri: str, timeout: float = 10.0) -> None:
    """Fail at once on a server that does not answer; MLflow's own client would retry
    with back-off for minutes before giving up."""
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)
    except requests.RequestException as error:
        reason = type(error).__name__
        if isinstance(error, requests.ConnectionError):
            reason = "connection refused or host unreachable"
        elif isinstance(error, requests.Timeout):
            reason = f"no answer within {timeout:.0f} s"
        raise TrackingError(f"tracking store {uri} is unreachable: {reason}") from None


def artifact_root(uri: str, experiment: str) -> str | None:
    """Artifact folder for a new experiment in a local store; servers choose their own."""
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        return (database.parent / "artifacts" / experiment).as_uri()
    return None


def ensure_experiment(client: MlflowClient, uri: str, name: str) -> str:
    """The id of experiment ``name``, created (with local artifacts) if it is new."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(f"experiment {name!r} is deleted in {uri}; restore or rename it")
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root(uri, name))


def find_experiment(client: MlflowClient, uri: str, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None or experiment.lifecycle_stage == "deleted":
        raise TrackingError(f"no experiment named {name!r} in {uri}")
    return experiment.experiment_id


def find_trial_run(client: MlflowClient, experiment_id: str, trial_id: str) -> str | None:
    """The run of a Ray Tune trial, if one was created before (a resumed trial)."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{TAG_TRIAL_ID}` = '{trial_id}'", max_results=1
    )
    return runs[0].info.run_id if runs else None


def find_sweep_run(client: MlflowClient, experiment_id: str):
    """The parent run of the sweep recorded in an experiment, or None."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'sweep'", max_results=1
    )
    return runs[0] if runs else None


def trial_runs_of(
    client: MlflowClient, experiment_id: str, parent_run_id: str, running_only: bool = False
) -> list:
    """The trial runs of one sweep; with ``running_only``, those still RUNNING."""
    query = f"tags.`{TAG_PARENT}` = '{parent_run_id}'"
    if running_only:
        query += " and attributes.status = 'RUNNING'"
    return client.search_runs([experiment_id], filter_string=query)


def load_logged_model(tracking_uri: str, source: str, owner: str):
    """Load a logged PyTorch model onto the CPU; a missing one is one line naming ``owner``."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        return mlflow.pytorch.load_model(source, map_location="cpu")
    except Exception as error:  # MLflow raises several kinds for a missing artifact
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise TrackingError(f"{owner}: final model cannot be loaded ({reason})") from None


class RunRecorder:
    """Writes one run's params, per-epoch metrics, figures and model to MLflow."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def log_params(self, params: dict[str, str]) -> None:
        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(key, value) for key, value in params.items() if key not in existing]
        for start in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        timestamp = mlflow.utils.time.get_current_time_millis()
        batch = [Metric(key, float(value), timestamp, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_figure(self, figure, file_name: str) -> None:
        import matplotlib.pyplot as plt

        self.client.log_figure(self.run_id, figure, file_name)
        plt.close(figure)

    def log_text(self, text: str, file_name: str) -> None:
        self.client.log_text(self.run_id, text, file_name)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def finish(self, outcome: str, failure: str | None = None) -> None:
        """End the run with an MLflow status that matches retina's outcome tag."""
        tags = {TAG_OUTCOME: outcome}
        if failure:
            tags[TAG_FAILURE] = failure[:500]
        self.set_tags(tags)
        status = {"failed": "FAILED", "killed": "KILLED"}.get(outcome, "FINISHED")
        self.client.set_terminated(self.run_id, status=status)


def log_torch_model(tracking_uri: str, run_id: str, model, example_input) -> None:
    """Log the final model with its input/output signature to ``run_id``."""
    import torch
    from mlflow.models import infer_signature

    model = model.to("cpu").eval()
    with torch.no_grad():
        example_output = torch.sigmoid(model(example_input)).numpy()
    signature = infer_signature(example_input.numpy(), example_output)
    mlflow.set_tracking_uri(tracking_uri)
    # The fluent API is the only way to log a flavoured model; resuming the run by id
    # and leaving it open lets the caller decide the run's final status.
    mlflow.start_run(run_id=run_id)
    try:
        mlflow.pytorch.log_model(
            model,
            name=MODEL_ARTIFACT,
            signature=signature,
            serialization_format="pickle",
            # Listing requirements skips MLflow's slow import-scanning inference.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "monai"],
        )
    finally:
        mlflow.end_run(status=RunStatus.to_string(RunStatus.RUNNING))


def finish_if_running(client: MlflowClient, run_id: str, outcome: str, reason: str = "") -> bool:
    """Give a run left RUNNING a final status; returns whether it was still running."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return False
    if run.info.status not in ("RUNNING", "SCHEDULED"):
        return False
    RunRecorder(client, run_id).finish(outcome, reason or None)
    return True
