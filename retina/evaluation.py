"""Score a run's final model on its untouched test photos and record the result.

The test split is rebuilt from the run's logged settings (split seed, fractions,
stratification), so the photos scored are exactly the ones the trial never read. The
report has the published experiment's shape: precision, recall, F1 and support for
background (0) and vessel (1), accuracy and macro and weighted averages, over the whole
image and inside the field of view, with the area under the ROC curve beside it.
"""

import json
import logging
from dataclasses import dataclass

import mlflow
import numpy as np
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sklearn.metrics import classification_report, roc_auc_score

from retina.config import TrialSettings
from retina.data.dataset import FundusDataset
from retina.errors import TrackingError
from retina.figures import predictions_figure
from retina.metrics import VesselHistograms, scores_at_threshold
from retina.prediction import CHAMPION_ALIAS
from retina.selection import TrialRecord
from retina.tracking import MODEL_ARTIFACT, TAG_EVALUATED, RunRecorder, load_logged_model
from retina.training import PhotoTensors, predict_probabilities

log = logging.getLogger(__name__)


@dataclass
class TestEvaluation:
    run_id: str
    name: str
    settings: TrialSettings
    test_photos: list[str]
    threshold: float  # chosen on validation in phase 1
    metrics: dict[str, float]
    reports: dict[str, dict]  # region -> scikit-learn classification report (dict form)
    report_text: str
    preview: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # photos, labels, probabilities


def test_split_names(dataset: FundusDataset, settings: TrialSettings) -> list[str]:
    split = dataset.split(
        settings.split_seed, settings.train_fraction, settings.val_fraction, settings.stratify
    )
    return list(split.test)


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


def evaluate_run(record: TrialRecord, dataset: FundusDataset, tracking_uri: str) -> TestEvaluation:
    """Predict the run's test photos with its final model and score them."""
    settings = record.settings
    model = load_logged_model(
        tracking_uri, f"runs:/{record.run_id}/{MODEL_ARTIFACT}", f"run {record.run_id}"
    )
    names = test_split_names(dataset, settings)
    test = PhotoTensors.from_dataset(dataset, dataset.index_of(names), torch.device("cpu"))
    probabilities = predict_probabilities(model, test.photos, settings)
    threshold = float(record.metrics.get("best_val_threshold", 0.5))

    histograms = VesselHistograms.empty()
    histograms.add(probabilities, test.vessels, test.fields_of_view)
    metrics: dict[str, float] = {}
    for region in ("fov", "image"):
        suffix = "" if region == "fov" else "_image"
        for score, value in scores_at_threshold(histograms, region, 0.5).items():
            metrics[f"test_{score}{suffix}"] = value
        for score, value in scores_at_threshold(histograms, region, threshold).items():
            if score != "auc":
                metrics[f"test_{score}{suffix}_at_val_threshold"] = value
    metrics["test_threshold"] = threshold

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
        texts.append(_format_report(f"{record.name}: test, {title}, threshold 0.5", report, auc))

    return TestEvaluation(
        run_id=record.run_id,
        name=record.name,
        settings=settings,
        test_photos=names,
        threshold=threshold,
        metrics=metrics,
        reports=reports,
        report_text="\n\n".join(texts),
        preview=(test.photos[:4], test.vessels[:4], probabilities[:4]),
    )


def record_evaluation(client: MlflowClient, evaluation: TestEvaluation) -> None:
    """Log test metrics, the report and a figure of test predictions to the run."""
    recorder = RunRecorder(client, evaluation.run_id)
    recorder.log_metrics(evaluation.metrics)
    recorder.log_text(evaluation.report_text, "test_report.txt")
    recorder.log_text(
        json.dumps(
            {"test_photos": evaluation.test_photos, "reports": evaluation.reports}, indent=2
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
