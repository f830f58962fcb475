"""Run a sweep: load the data once, open the MLflow parent run, let Ray Tune run trials.

The driver checks everything a trial would otherwise fail on (sweep file, data, tracking
store) before any trial starts, loads the preprocessed photos once and hands them to
every trial through Ray's object store, so trials on any node read the same arrays.
"""

import logging
import math
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from rich.console import Console

import retina
from retina.config import LogUniform, SweepSpec, TrialSettings, Uniform
from retina.data.dataset import FundusDataset
from retina.errors import DataError, RetinaError, TrackingError
from retina.sweep.monitor import RunFinisher, SweepProgress
from retina.sweep.trial import SCHEDULER_TIME, SweepContext, run_trial
from retina.tracking import (
    TAG_FAILURE,
    TAG_OUTCOME,
    TAG_ROLE,
    RunRecorder,
    connect,
    ensure_experiment,
    find_sweep_run,
    finish_if_running,
    is_local_uri,
    trial_runs_of,
)
from retina.training import trial_split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepRequest:
    """A sweep as the user asked for it, command-line overrides applied."""

    sweep_file: Path
    spec: SweepSpec
    experiment: str
    tracking_uri: str
    storage: str  # a local folder or a URI (file://, s3://, gs://, ...)
    resume: bool = False
    address: str | None = None
    max_concurrent: int | None = None
    cpus_per_trial: float | None = None
    gpus_per_trial: float | None = None
    workers_per_trial: int | None = None

    @property
    def sweep_path(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.experiment}"


@dataclass
class SweepOutcome:
    parent_run_id: str
    experiment_id: str
    interrupted: bool


def param_space(spec: SweepSpec) -> dict:
    """Tune's search space: fixed settings, grids and sampled axes, over every field."""
    space: dict = TrialSettings.model_validate(spec.fixed).model_dump()
    for key, axis in spec.search.items():
        if isinstance(axis, LogUniform):
            space[key] = tune.loguniform(*axis.loguniform)
        elif isinstance(axis, Uniform):
            space[key] = tune.uniform(*axis.uniform)
        else:
            space[key] = tune.grid_search(axis)
    return space


def _scheduler(spec: SweepSpec):
    if spec.scheduler.name == "none":
        return FIFOScheduler()
    longest = max(
        [TrialSettings.model_validate(spec.fixed).epochs]
        + [value for value in spec.search.get("epochs", []) if isinstance(value, int)]
    )
    return ASHAScheduler(
        time_attr=SCHEDULER_TIME,
        max_t=max(longest, spec.scheduler.grace_period),
        grace_period=spec.scheduler.grace_period,
        reduction_factor=spec.scheduler.reduction_factor,
        # Keep the trials that reach the last epoch: they still have phase 2 to run.
        stop_last_trials=False,
    )


def code_version() -> str:
    """The git commit of the code, with ``-dirty`` for local changes, or the version."""
    package_dir = Path(retina.__file__).parent
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=package_dir,
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        ).stdout.strip()
        return f"{retina.__version__}+{commit}"
    except (OSError, subprocess.SubprocessError):
        return retina.__version__


def start_ray(address: str | None) -> None:
    """Join the cluster at ``address``, or start a local Ray runtime."""
    if ray.is_initialized():
        return
    # A local runtime authenticates its processes with a token; Ray's notice of it is
    # not something a user of retina can act on.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )
    # Trial logs stay in Ray's log files; the console shows retina's own progress.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Checkpoints every epoch are the point; Tune's warning about them is noise here.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    ray.init(
        address=address,
        log_to_driver=False,
        include_dashboard=False,
        configure_logging=True,
        logging_level=logging.WARNING,
    )


def check_cluster_storage(request: SweepRequest) -> None:
    """Refuse stores and paths that other nodes of a cluster could not reach."""
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) <= 1:
        return
    if is_local_uri(request.tracking_uri):
        raise TrackingError(
            f"tracking store {request.tracking_uri} is local to this machine but the Ray "
            f"cluster has {len(nodes)} nodes; start `retina server` and pass "
            "--tracking-uri http://HOST:PORT"
        )
    storage = request.storage
    if "://" not in storage and not _is_network_mount(storage):
        raise RetinaError(
            f"--storage {storage} is a local path but the Ray cluster has {len(nodes)} nodes: "
            "it must be shared storage (a network file system path or a URI such as s3://)"
        )


def _is_network_mount(path: str) -> bool:
    """Whether ``path`` lies on a network file system (NFS, CIFS, Lustre, ...)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return False
    best, fs_type = "", ""
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3 and path.startswith(parts[1]) and len(parts[1]) > len(best):
            best, fs_type = parts[1], parts[2]
    return fs_type in {"nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "fuse.sshfs"}


def _open_parent_run(request: SweepRequest, dataset: FundusDataset) -> tuple[str, str, object]:
    client = connect(request.tracking_uri)
    experiment_id = ensure_experiment(client, request.tracking_uri, request.experiment)
    existing = find_sweep_run(client, experiment_id)
    if existing and request.resume:
        parent = existing.info.run_id
        client.update_run(parent, status="RUNNING")
        return client, experiment_id, parent

    run = client.create_run(experiment_id, run_name=request.experiment, tags={TAG_ROLE: "sweep"})
    recorder = RunRecorder(client, run.info.run_id)
    recorder.log_params(
        {
            "sweep_file": request.sweep_file.name,
            "code_version": code_version(),
            "data_source": dataset.source,
            "data_layout": dataset.layout,
            "data_fingerprint": dataset.fingerprint,
            "photos": str(len(dataset)),
            "resolution": str(dataset.resolution),
            "grid_trials": str(request.spec.grid_size()),
        }
    )
    recorder.log_artifact(request.sweep_file)
    return client, experiment_id, run.info.run_id


def _trial_resources(cpus: float, gpus: float, workers: int):
    """One bundle per data-parallel worker; the trial's own process is the first."""
    if workers == 1:
        return {"cpu": cpus, "gpu": gpus}
    bundle = {"CPU": cpus} | ({"GPU": gpus / workers} if gpus else {})
    return tune.PlacementGroupFactory([bundle] * workers)


def check_splits(spec: SweepSpec, dataset: FundusDataset, source: Path) -> None:
    """Split the data for every split seed of the sweep now, not in a failing trial."""
    fixed = TrialSettings.model_validate(spec.fixed)
    seeds = spec.search.get("split_seed", [fixed.split_seed])
    for seed in seeds if isinstance(seeds, list) else [fixed.split_seed]:
        try:
            trial_split(dataset, fixed.model_copy(update={"split_seed": seed}))
        except DataError as error:
            where = f"{source}: fixed." if fixed.fixed_split else ""
            raise DataError(f"{where}{error}") from None


def run_sweep(
    request: SweepRequest, dataset: FundusDataset, console: Console | None = None
) -> SweepOutcome:
    """Run every trial of the sweep; the MLflow store ends with no run left RUNNING.

    With a terminal ``console`` the trials are shown in a live table there.
    """
    resources = request.spec.resources
    cpus = request.cpus_per_trial or resources.cpus_per_trial
    gpus = (
        request.gpus_per_trial if request.gpus_per_trial is not None else resources.gpus_per_trial
    )
    max_concurrent = request.max_concurrent or resources.max_concurrent
    workers = request.workers_per_trial or resources.workers_per_trial
    if gpus > 1:
        workers = max(workers, math.ceil(gpus))

    check_splits(request.spec, dataset, request.sweep_file)
    start_ray(request.address)
    check_cluster_storage(request)
    client, experiment_id, parent_run_id = _open_parent_run(request, dataset)
    context = SweepContext(
        request.tracking_uri, experiment_id, parent_run_id, cpus, workers, gpus / workers
    )
    finisher = RunFinisher(request.tracking_uri, experiment_id)
    progress = SweepProgress(console)

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, context=context, dataset=dataset),
        _trial_resources(cpus, gpus, workers),
    )
    if request.resume and tune.Tuner.can_restore(request.sweep_path):
        log.info("resuming the sweep stored in %s", request.sweep_path)
        tuner = tune.Tuner.restore(
            request.sweep_path,
            trainable=trainable,
            param_space=param_space(request.spec),
            resume_unfinished=True,
            resume_errored=True,
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(request.spec),
            tune_config=tune.TuneConfig(
                metric="val_f1",
                mode="max",
                scheduler=_scheduler(request.spec),
                num_samples=request.spec.num_samples,
                max_concurrent_trials=max_concurrent or None,
            ),
            run_config=tune.RunConfig(
                name=request.experiment,
                storage_path=request.storage,
                failure_config=tune.FailureConfig(max_failures=request.spec.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=[finisher, progress],
                verbose=0,
            ),
        )
    _finish_leftover_runs(client, experiment_id, parent_run_id)
    # Tune turns Ctrl-C into a clean stop that saves the sweep's state; make SIGTERM
    # (a scheduler's or a reboot's) do the same.
    previous_sigterm = signal.signal(signal.SIGTERM, _interrupt_as_ctrl_c)
    try:
        tuner.fit()
    except Exception as error:
        # Tune itself gave up (e.g. Ray's memory monitor killed workers it still needed):
        # the finished trials stay, the others can be resumed.
        reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise RetinaError(
            f"sweep {request.experiment} stopped: {reason[:300]}; finished trials are kept, "
            f"continue with: retina sweep {request.sweep_file} --resume"
        ) from None
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        # Tune returns normally after Ctrl-C; trials without an outcome tell it apart.
        concluded = [
            run
            for run in trial_runs_of(client, experiment_id, parent_run_id)
            if run.data.tags.get(TAG_OUTCOME) in ("finished", "failed", "stopped_early")
        ]
        interrupted = len(concluded) < request.spec.grid_size()
        # Whatever ended the sweep, no trial's run may stay RUNNING, nor the sweep's.
        _finish_leftover_runs(client, experiment_id, parent_run_id)
        client.set_terminated(parent_run_id, status="KILLED" if interrupted else "FINISHED")
    if interrupted:
        log.warning(
            "sweep %s interrupted; finished trials are kept. Continue it with: "
            "retina sweep %s --resume",
            request.experiment,
            request.sweep_file,
        )
    return SweepOutcome(parent_run_id, experiment_id, interrupted)


def _finish_leftover_runs(client, experiment_id: str, parent_run_id: str) -> None:
    """Mark runs a stopped sweep left RUNNING as killed; resumed trials reattach to them."""
    for run in trial_runs_of(client, experiment_id, parent_run_id, running_only=True):
        finish_if_running(
            client, run.info.run_id, "killed", "the sweep stopped before this trial finished"
        )


def _interrupt_as_ctrl_c(signum, frame) -> None:
    os.kill(os.getpid(), signal.SIGINT)


def existing_sweep(request: SweepRequest) -> bool:
    return tune.Tuner.can_restore(request.sweep_path)


@dataclass(frozen=True)
class TrialSummary:
    name: str
    outcome: str
    best_val_f1: float | None
    best_epoch: int | None
    reason: str


def summarize_trials(client, experiment_id: str, parent_run_id: str) -> list[TrialSummary]:
    """Every trial of the sweep as MLflow recorded it, best validation F1 first."""
    runs = trial_runs_of(client, experiment_id, parent_run_id)
    summaries = [
        TrialSummary(
            name=run.info.run_name,
            outcome=run.data.tags.get(TAG_OUTCOME, run.info.status.lower()),
            best_val_f1=run.data.metrics.get("best_val_f1"),
            best_epoch=int(run.data.metrics["best_epoch"])
            if "best_epoch" in run.data.metrics
            else None,
            reason=run.data.tags.get(TAG_FAILURE, ""),
        )
        for run in runs
    ]
    return sorted(summaries, key=lambda t: -(t.best_val_f1 if t.best_val_f1 is not None else -1))
