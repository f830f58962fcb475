"""One Ray Tune trial: phase 1, the final-training strategy, and its MLflow run.

The trial owns its MLflow run from creation to its final status. It reports every
epoch of both phases to Tune with a checkpoint holding everything needed to continue
(weights, optimizer, schedule, augmentation state, the best epoch so far) and the MLflow
run id, so that a resumed or retried trial carries on in the same run and the same phase.
"""

import logging
import os
import socket
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from ray import tune

from retina.config import TrialSettings
from retina.data.dataset import FundusDataset
from retina.figures import learning_curves_figure, predictions_figure
from retina.sweep.data_parallel import (
    join_process_group,
    rendezvous_address,
    start_shard_workers,
    worker_device,
)
from retina.tracking import (
    TAG_FAILURE,
    TAG_NODE,
    TAG_OUTCOME,
    TAG_PARENT,
    TAG_ROLE,
    TAG_TRIAL_ID,
    RunRecorder,
    connect,
    find_trial_run,
    log_torch_model,
)
from retina.training import (
    SINGLE_PROCESS,
    DataParallel,
    DivergedError,
    PhaseOneProgress,
    PhotoTensors,
    ResumePoint,
    TrainingRun,
    final_training_epochs,
    predict_probabilities,
    run_final_training,
    run_phase_one,
    split_tensors,
)

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "trial_state.pt"
# Results with this key drive ASHA; phase-2 results leave it out so that ASHA neither
# compares nor stops a trial while it produces its final model.
SCHEDULER_TIME = "epoch"


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep shares, sent once through Ray's object store."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    cpus_per_trial: float  # per worker, when a trial has several
    workers_per_trial: int = 1
    gpus_per_worker: float = 0


def _open_run(context: SweepContext, settings: TrialSettings, trial_id: str) -> RunRecorder:
    """Reattach to this trial's run if it has one (resume, retry), else create it."""
    client = connect(context.tracking_uri)
    run_id = find_trial_run(client, context.experiment_id, trial_id)
    if run_id is None:
        run = client.create_run(
            context.experiment_id,
            run_name=settings.run_name(),
            tags={TAG_PARENT: context.parent_run_id, TAG_ROLE: "trial", TAG_TRIAL_ID: trial_id},
        )
        run_id = run.info.run_id
    else:
        tags = client.get_run(run_id).data.tags
        if tags.get(TAG_OUTCOME) != "finished":
            # The run goes on: an outcome from its interruption no longer holds.
            for key in (TAG_OUTCOME, TAG_FAILURE):
                if key in tags:
                    client.delete_tag(run_id, key)
        client.update_run(run_id, status="RUNNING")
        log.info("reattached to MLflow run %s", run_id)
    recorder = RunRecorder(client, run_id)
    recorder.log_params(settings.as_params())
    # Where the trial ran: on a cluster, which node; resumed trials may move.
    recorder.set_tags(
        {
            TAG_NODE: ray.get_runtime_context().get_node_id(),
            "retina.host": socket.gethostname(),
            "retina.pid": str(os.getpid()),
        }
    )
    return recorder


def _restore() -> ResumePoint | None:
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=False)


def _report(result: dict, point: ResumePoint) -> None:
    """One Tune result with a checkpoint to carry on from."""
    with tempfile.TemporaryDirectory() as folder:
        torch.save(point, Path(folder) / CHECKPOINT_FILE)
        tune.report(result, checkpoint=tune.Checkpoint.from_directory(folder))


def run_trial(config: dict, context: SweepContext, dataset: FundusDataset) -> None:
    """Train one configuration; the Ray Tune function trainable."""
    settings = TrialSettings.model_validate(config)
    torch.set_num_threads(max(1, int(context.cpus_per_trial)))
    device = worker_device()
    trial_id = tune.get_context().get_trial_id()
    recorder = _open_run(context, settings, trial_id)
    log.info("trial %s (%s) on %s, run %s", trial_id, settings.run_name(), device, recorder.run_id)
    finished = recorder.client.get_run(recorder.run_id).data
    if finished.tags.get(TAG_OUTCOME) == "finished":
        # The trial finished after the sweep's last saved state: keep it, do not redo it.
        recorder.finish("finished")
        best = finished.metrics.get("best_val_f1", 0.0)
        tune.report({"outcome": "finished", "mlflow_run_id": recorder.run_id, "val_f1": best})
        return

    try:
        resume_from = _restore()
        parallel, shard_workers = SINGLE_PROCESS, []
        if context.workers_per_trial > 1:
            address = rendezvous_address()
            shard_workers = start_shard_workers(
                context.workers_per_trial,
                address,
                config,
                context.cpus_per_trial,
                context.gpus_per_worker,
                dataset,
                resume_from,
            )
            parallel = join_process_group(0, context.workers_per_trial, address, device)
        train, val = split_tensors(dataset, settings, device)
        progress = _phase_one(settings, train, val, device, recorder, resume_from, parallel)
        if resume_from is None or not resume_from.in_phase_two:
            _log_phase_one_figures(settings, val, device, progress, recorder)
        model = _phase_two(settings, train, val, device, progress, recorder, resume_from, parallel)
        ray.get(shard_workers)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**20
            recorder.log_metrics({"peak_gpu_memory_mb": peak})
        example = train.photos[:1].detach().float().cpu()
        log_torch_model(context.tracking_uri, recorder.run_id, model, example)
    except DivergedError as error:
        # A diverged trial would diverge again on retry: end it here, not in Tune's retries.
        recorder.finish("failed", str(error))
        tune.report({"outcome": "failed", "mlflow_run_id": recorder.run_id, "val_f1": 0.0})
        return
    except Exception as error:
        last_line = traceback.format_exception_only(error)[-1].strip()
        recorder.finish("failed", last_line)
        raise

    recorder.finish("finished")
    tune.report(
        {
            "outcome": "finished",
            "mlflow_run_id": recorder.run_id,
            "val_f1": progress.best_f1,
            "best_val_f1": progress.best_f1,
        }
    )


def _phase_one(
    settings: TrialSettings,
    train: PhotoTensors,
    val: PhotoTensors,
    device: torch.device,
    recorder: RunRecorder,
    resume_from: ResumePoint | None,
    parallel: DataParallel,
) -> PhaseOneProgress:
    """Phase 1 with a Tune report, MLflow metrics and a checkpoint after every epoch."""

    def on_epoch(metrics: dict[str, float], progress: PhaseOneProgress, run: TrainingRun) -> None:
        epoch = progress.epochs_done
        recorder.log_metrics(metrics, step=epoch)
        if progress.best_epoch == epoch:
            best = {f"best_{key}": value for key, value in progress.best_metrics.items()}
            best |= {"best_epoch": epoch, "best_val_threshold": progress.best_threshold}
            recorder.log_metrics(best, step=epoch)
        result = {
            SCHEDULER_TIME: epoch,
            "val_f1": metrics["val_f1"],
            "val_loss": metrics["val_loss"],
            "train_loss": metrics["train_loss"],
            "best_val_f1": progress.best_f1,
            "mlflow_run_id": recorder.run_id,
        }
        _report(result, ResumePoint(progress, phase_one_run=run.state()))

    return run_phase_one(settings, train, val, device, on_epoch, resume_from, parallel)


def _phase_two(
    settings: TrialSettings,
    train: PhotoTensors,
    val: PhotoTensors,
    device: torch.device,
    progress: PhaseOneProgress,
    recorder: RunRecorder,
    resume_from: ResumePoint | None,
    parallel: DataParallel,
) -> torch.nn.Module:
    """The final training with an MLflow metric, a Tune report and a checkpoint after
    every epoch; its results carry the phase-1 best as val_f1, which Tune requires in
    every result, and no scheduler time, so that ASHA leaves the trial alone."""
    epochs = final_training_epochs(settings, progress)

    def on_epoch(epoch: int, loss: float, run: TrainingRun) -> None:
        recorder.log_metrics({"final_train_loss": loss}, epoch)
        result = {
            "final_epoch": epoch,
            "final_epochs": epochs,
            "final_train_loss": loss,
            "val_f1": progress.best_f1,
            "best_val_f1": progress.best_f1,
            "mlflow_run_id": recorder.run_id,
        }
        _report(result, ResumePoint(progress, phase_two_epochs=epoch, phase_two_run=run.state()))

    return run_final_training(
        settings, train, val, device, progress, on_epoch, parallel, resume_from
    )


def _log_phase_one_figures(
    settings: TrialSettings,
    val: PhotoTensors,
    device: torch.device,
    progress: PhaseOneProgress,
    recorder: RunRecorder,
) -> None:
    recorder.log_figure(learning_curves_figure(progress.history), "learning_curves.png")
    model = TrainingRun.start(settings, device, 1, 1, weights=progress.best_weights).model
    shown = slice(0, 4)
    probabilities = predict_probabilities(model, val.photos[shown], settings)
    recorder.log_figure(
        predictions_figure(
            val.photos[shown].cpu(),
            val.vessels[shown].cpu(),
            probabilities.cpu(),
            threshold=progress.best_threshold,
            title="validation (phase-1 best epoch)",
        ),
        "val_predictions.png",
    )
