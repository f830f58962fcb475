"""Score a run's final model on its untouched test photos and record the result.

The test split is rebuilt from the run's logged settings (split seed, fractions,
stratification, or the photo names of a fixed split), so the photos scored are exactly
the ones the trial never read. The report has the published experiment's shape:
precision, recall, F1 and support for background (0) and vessel (1), accuracy and macro
and weighted averages, over the whole image and inside the field of view, with the area
under the ROC curve beside it.

Beside it come the scores the field compares: at the threshold chosen on validation,
F1, Matthews correlation and the area under the precision-recall curve; F1 per photo
(mean and spread); and all of them again at native resolution, where the predictions
are resized back to each photo's own size and scored against its original label inside
its original mask.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sklearn.metrics import classification_report, roc_auc_score

from retina.config import TrialSettings
from retina.data.dataset import FundusDataset
from retina.data.images import BINARY_THRESHOLD, read_grey
from retina.data.layouts import find_cases
from retina.errors import DataError, RetinaError, TrackingError
from retina.figures import predictions_figure
from retina.metrics import VesselHistograms, scores_at_threshold
from retina.prediction import CHAMPION_ALIAS, to_photo_size
from retina.selection import TrialRecord
from retina.tracking import MODEL_ARTIFACT, TAG_EVALUATED, RunRecorder, load_logged_model
from retina.training import PhotoTensors, predict_probabilities, trial_split

log = logging.getLogger(__name__)


@dataclass
class TestEvaluation:
    run_id: str | None  # None for an ensemble, which has no run of its own
    name: str
    settings: TrialSettings
    test_photos: list[str]
    threshold: float  # chosen on validation in phase 1
    metrics: dict[str, float]
    reports: dict[str, dict]  # region -> scikit-learn classification report (dict form)
    report_text: str
    preview: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # photos, labels, probabilities
    photo_scores: dict[str, dict[str, float]]  # photo -> F1 in the FOV at each resolution


# The test scores the field compares, in the order tables show them.
HEADLINE_SCORES = (
    "test_f1_at_val_threshold",
    "test_native_f1_at_val_threshold",
    "test_photo_f1_mean",
    "test_mcc_at_val_threshold",
    "test_auc",
    "test_auc_pr",
    "test_f1",
    "test_f1_image",
)


def test_split_names(dataset: FundusDataset, settings: TrialSettings) -> list[str]:
    return list(trial_split(dataset, settings).test)


def _region_report(truth: np.ndarray, predicted: np.ndarray) -> dict:
    return classification_report(
        truth, predicted, labels=[0, 1], digits=4, output_dict=True, zero_division=0
    )


def _format_report(title: str, report: dict, auc: float) -> str:
    lines = [title, f"{'':>14}{'precision':>10}{'recall':>10}{'f1-score':>10}{'support':>12}"]
    for label in ("0", "1"):
        row = report[label]
        lines.append(
            f"{label:>14}{row['precision']:>10.4f}{row['recall']:>10.4f}"
            f"{row['f1-score']:>10.4f}{int(row['support']):>12d}"
        )
    total = int(report["macro avg"]["support"])
    lines.append(f"{'accuracy':>14}{'':>20}{report['accuracy']:>10.4f}{total:>12d}")
    for average in ("macro avg", "weighted avg"):
        row = report[average]
        lines.append(
            f"{average:>14}{row['precision']:>10.4f}{row['recall']:>10.4f}"
            f"{row['f1-score']:>10.4f}{int(row['support']):>12d}"
        )
    lines.append(f"{'AUC':>14}{'':>20}{auc:>10.4f}")
    return "\n".join(lines)


def _scores(histograms: VesselHistograms, prefix: str, threshold: float) -> dict[str, float]:
    """``<prefix>_<score>[_image][_at_val_threshold]``: both regions, at 0.5 and at the
    validation threshold (threshold-free areas only once)."""
    metrics = {}
    for region in ("fov", "image"):
        suffix = "" if region == "fov" else "_image"
        for score, value in scores_at_threshold(histograms, region, 0.5).items():
            metrics[f"{prefix}_{score}{suffix}"] = value
        for score, value in scores_at_threshold(histograms, region, threshold).items():
            if score not in ("auc", "auc_pr"):
                metrics[f"{prefix}_{score}{suffix}_at_val_threshold"] = value
    return metrics


def _photo_spread(
    photo_scores: dict[str, dict[str, float]], key: str, prefix: str
) -> dict[str, float]:
    values = [scores[key] for scores in photo_scores.values()]
    return {
        f"{prefix}_photo_f1_mean": float(np.mean(values)),
        f"{prefix}_photo_f1_std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
    }


def _native_histograms(
    dataset: FundusDataset,
    names: list[str],
    probabilities: torch.Tensor,
    threshold: float,
    photo_scores: dict[str, dict[str, float]],
) -> VesselHistograms:
    """Score at each photo's own size: the probabilities are resized back to it and
    compared with the original label inside the original field-of-view mask."""
    _, cases = find_cases(Path(dataset.source))
    case_of = {case.name: case for case in cases}
    histograms = VesselHistograms.empty()
    for name, square in zip(names, probabilities, strict=True):
        case = case_of.get(name)
        if case is None:
            raise DataError(f"{dataset.source}: photo {name!r} is no longer in the dataset")
        label = read_grey(case.label) >= BINARY_THRESHOLD
        height, width = label.shape
        mask = (
            read_grey(case.mask) >= BINARY_THRESHOLD
            if case.mask is not None
            else np.ones_like(label)
        )
        full = torch.from_numpy(to_photo_size(square[0].numpy(), width, height))
        vessels, inside = torch.from_numpy(label), torch.from_numpy(mask)
        photo = VesselHistograms.empty()
        photo.add(full, vessels, inside)
        photo_scores[name]["native_f1"] = scores_at_threshold(photo, "fov", threshold)["f1"]
        histograms.merge(photo)
    return histograms


def score_test_predictions(
    name: str,
    settings: TrialSettings,
    dataset: FundusDataset,
    names: list[str],
    test: PhotoTensors,
    probabilities: torch.Tensor,
    threshold: float,
    native: bool = True,
) -> tuple[dict[str, float], dict[str, dict], str, dict[str, dict[str, float]]]:
    """Metrics, classification reports, their text, and per-photo F1 of test predictions.

    Scores at the training resolution come from the resized labels and masks; with
    ``native`` also at each photo's own size against its original label and mask.
    """
    histograms = VesselHistograms.empty()
    photo_scores: dict[str, dict[str, float]] = {}
    for index, photo_name in enumerate(names):
        photo = VesselHistograms.empty()
        part = slice(index, index + 1)
        photo.add(probabilities[part], test.vessels[part], test.fields_of_view[part])
        photo_scores[photo_name] = {"f1": scores_at_threshold(photo, "fov", threshold)["f1"]}
        histograms.merge(photo)
    metrics = _scores(histograms, "test", threshold) | _photo_spread(photo_scores, "f1", "test")
    if native:
        native_histograms = _native_histograms(
            dataset, names, probabilities, threshold, photo_scores
        )
        metrics |= _scores(native_histograms, "test_native", threshold)
        metrics |= _photo_spread(photo_scores, "native_f1", "test_native")
    else:
        # Not scored this time: NaN replaces any native score of an earlier evaluation,
        # so that a run never shows scores of two different evaluations side by side.
        metrics |= {f"test_native_{key[5:]}": float("nan") for key in list(metrics)}
    metrics["test_threshold"] = threshold
    metrics["test_time_flips"] = float(settings.test_time_flips)

    truth = test.vessels.numpy().astype(np.uint8).ravel()
    scores = probabilities.numpy().ravel()
    inside = test.fields_of_view.numpy().ravel()
    reports, texts = {}, []
    for region, selected, title in (
        ("image", slice(None), "whole image"),
        ("fov", inside, "inside the field of view"),
    ):
        region_truth, region_scores = truth[selected], scores[selected]
        report = _region_report(region_truth, (region_scores >= 0.5).astype(np.uint8))
        auc = float(roc_auc_score(region_truth, region_scores))
        reports[region] = report | {"auc": auc}
        averaged = ", flip-averaged" if settings.test_time_flips else ""
        texts.append(_format_report(f"{name}: test, {title}, threshold 0.5{averaged}", report, auc))
    return metrics, reports, "\n\n".join(texts), photo_scores


# A run's test predictions under one choice of flip averaging: the photo names, their
# tensors and the probabilities. `retina best --evaluate --ensemble K` shares one such
# store between the runs it evaluates and the ensemble, so no model predicts twice.
TestPredictions = tuple[list[str], PhotoTensors, torch.Tensor]
PredictionStore = dict[tuple[str, bool], TestPredictions]


def _test_predictions(
    record: TrialRecord,
    settings: TrialSettings,
    dataset: FundusDataset,
    tracking_uri: str,
    store: PredictionStore,
) -> TestPredictions:
    key = (record.run_id, settings.test_time_flips)
    if key not in store:
        model = load_logged_model(
            tracking_uri, f"runs:/{record.run_id}/{MODEL_ARTIFACT}", f"run {record.run_id}"
        )
        names = test_split_names(dataset, settings)
        cpu = torch.device("cpu")
        test = PhotoTensors.from_dataset(dataset, dataset.index_of(names), cpu, settings)
        store[key] = (names, test, predict_probabilities(model, test.photos, settings))
    return store[key]


def _evaluate(
    members: list[TrialRecord],
    name: str,
    dataset: FundusDataset,
    tracking_uri: str,
    test_time_flips: bool | None,
    native: bool,
    store: PredictionStore | None,
) -> TestEvaluation:
    """Score the mean test probabilities of runs that share a test split (one run, or an
    ensemble) at the mean of their validation thresholds."""
    store = {} if store is None else store
    total = None
    for record in members:
        settings = record.settings.with_test_time_flips(test_time_flips)
        names, test, probabilities = _test_predictions(
            record, settings, dataset, tracking_uri, store
        )
        total = probabilities if total is None else total + probabilities
    probabilities = total / len(members)
    threshold = float(np.mean([r.metrics.get("best_val_threshold", 0.5) for r in members]))
    metrics, reports, text, photo_scores = score_test_predictions(
        name, settings, dataset, names, test, probabilities, threshold, native
    )
    return TestEvaluation(
        run_id=members[0].run_id if len(members) == 1 else None,
        name=name,
        settings=settings,
        test_photos=names,
        threshold=threshold,
        metrics=metrics,
        reports=reports,
        report_text=text,
        preview=(test.photos[:4], test.vessels[:4], probabilities[:4]),
        photo_scores=photo_scores,
    )


def evaluate_run(
    record: TrialRecord,
    dataset: FundusDataset,
    tracking_uri: str,
    test_time_flips: bool | None = None,
    native: bool = True,
    store: PredictionStore | None = None,
) -> TestEvaluation:
    """Predict the run's test photos with its final model and score them at its
    validation threshold; ``test_time_flips`` overrides the run's own choice."""
    return _evaluate([record], record.name, dataset, tracking_uri, test_time_flips, native, store)


def ensemble_members(records: list[TrialRecord], metric: str, size: int) -> list[TrialRecord]:
    """The ``size`` runs with the best validation ``metric`` among those that share the
    test photos of the best run (its split), best first; never chosen by test results."""
    ranked = sorted(
        (r for r in records if r.has_final_model),
        key=lambda r: (-r.metrics.get(metric, float("-inf")), r.name),
    )
    if not ranked:
        raise RetinaError("no finished run with a final model to build an ensemble from")

    def split_of(record: TrialRecord) -> tuple:
        s = record.settings
        if s.fixed_split:
            return (s.train_photos, s.val_photos, s.test_photos)
        return (s.split_seed, s.train_fraction, s.val_fraction, s.stratify)

    same_split = [r for r in ranked if split_of(r) == split_of(ranked[0])]
    if len(same_split) < size:
        log.warning(
            "only %d finished runs share the test photos of the best run %s; the ensemble "
            "has %d members, not %d",
            len(same_split),
            ranked[0].name,
            len(same_split),
            size,
        )
    return same_split[:size]


def evaluate_ensemble(
    members: list[TrialRecord],
    dataset: FundusDataset,
    tracking_uri: str,
    test_time_flips: bool | None = None,
    native: bool = True,
    store: PredictionStore | None = None,
) -> TestEvaluation:
    """Average the test probabilities of runs that share a test split, and score that at
    the mean of the members' validation thresholds."""
    name = f"ensemble of {len(members)}"
    return _evaluate(members, name, dataset, tracking_uri, test_time_flips, native, store)


def record_ensemble(
    client: MlflowClient, sweep_run_id: str, evaluation: TestEvaluation, members: list
) -> None:
    """Log an ensemble's test metrics and report to the sweep's parent run."""
    recorder = RunRecorder(client, sweep_run_id)
    recorder.log_metrics({f"ensemble_{key}": value for key, value in evaluation.metrics.items()})
    recorder.log_text(
        json.dumps(
            {
                "members": [{"run_id": r.run_id, "name": r.name} for r in members],
                "threshold": evaluation.threshold,
                "test_photos": evaluation.test_photos,
                "metrics": evaluation.metrics,
                "photo_scores": evaluation.photo_scores,
                "reports": evaluation.reports,
            },
            indent=2,
        ),
        "ensemble_report.json",
    )


def record_evaluation(client: MlflowClient, evaluation: TestEvaluation) -> None:
    """Log test metrics, the report and a figure of test predictions to the run."""
    recorder = RunRecorder(client, evaluation.run_id)
    recorder.log_metrics(evaluation.metrics)
    recorder.log_text(evaluation.report_text, "test_report.txt")
    recorder.log_text(
        json.dumps(
            {
                "test_photos": evaluation.test_photos,
                "photo_scores": evaluation.photo_scores,
                "reports": evaluation.reports,
            },
            indent=2,
        ),
        "test_report.json",
    )
    photos, vessels, probabilities = evaluation.preview
    recorder.log_figure(
        predictions_figure(
            photos,
            vessels,
            probabilities,
            threshold=evaluation.threshold,
            title="test photos (final model)",
            names=evaluation.test_photos[: len(photos)],
        ),
        "test_predictions.png",
    )
    recorder.set_tags({TAG_EVALUATED: "true"})


def choose_champion(records: list[TrialRecord], metric: str) -> TrialRecord:
    """The evaluated run to serve: the best by its validation ``metric``, never by test.

    The strategies of one split seed share phase 1 and so tie on phase-1 metrics, and
    validation cannot rank them (both consume the validation photos); ties go to the
    first run in name order, so the choice is repeatable and blind to test results.
    """
    ranked = sorted(records, key=lambda record: record.name)
    return max(ranked, key=lambda record: record.metrics.get(metric, float("-inf")))


def register_champion(
    tracking_uri: str,
    name: str,
    record: TrialRecord,
    evaluation: TestEvaluation,
    experiment: str,
    metric: str,
) -> ModelVersion:
    """Register a run's final model as a new version of ``name`` with the champion alias.

    The version's description and tags hold its test results, so the registry answers
    how good the served model is without opening the run.
    """
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    outputs = client.get_run(evaluation.run_id).outputs
    logged = [output.model_id for output in (outputs.model_outputs if outputs else [])]
    # MLflow 3 stores a run's model as a logged model; naming it avoids a lookup warning.
    source = f"models:/{logged[-1]}" if logged else f"runs:/{evaluation.run_id}/{MODEL_ARTIFACT}"
    tags = {
        "retina.experiment": experiment,
        "retina.run_name": evaluation.name,
        "retina.strategy": evaluation.settings.strategy,
        "retina.split_seed": str(evaluation.settings.split_seed),
        "retina.chosen_by": f"{metric}={record.metrics.get(metric, float('nan')):.4f}",
        "retina.test_photos": str(len(evaluation.test_photos)),
    } | {key: f"{value:.6g}" for key, value in sorted(evaluation.metrics.items())}
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        version = mlflow.register_model(source, name, tags=tags)
    except MlflowException as error:
        reason = str(error).splitlines()[0][:160]
        raise TrackingError(
            f"cannot register run {evaluation.run_id} as {name!r}: {reason}"
        ) from None
    client.update_model_version(name, version.version, description=_champion_note(evaluation))
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version.version)
    log.debug(
        "registered run %s as %s version %s (@%s)",
        evaluation.run_id,
        name,
        version.version,
        CHAMPION_ALIAS,
    )
    return client.get_model_version(name, version.version)


def _champion_note(evaluation: TestEvaluation) -> str:
    m, photos = evaluation.metrics, len(evaluation.test_photos)
    return (
        f"{evaluation.name} (run {evaluation.run_id}), final-training strategy "
        f"{evaluation.settings.strategy}, chosen on validation. Test, {photos} "
        f"photos inside the field of view: F1 {m['test_f1']:.4f} at threshold 0.5, "
        f"{m['test_f1_at_val_threshold']:.4f} at the validation threshold "
        f"{evaluation.threshold:.3f}; precision {m['test_precision']:.4f}, recall "
        f"{m['test_recall']:.4f}, accuracy {m['test_accuracy']:.4f}, AUC {m['test_auc']:.4f}. "
        f"Whole image: F1 {m['test_f1_image']:.4f}, AUC {m['test_auc_image']:.4f}."
    )
