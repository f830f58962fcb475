"""`retina report` on a real evaluated sweep: one HTML page, figures on the parent run."""

import re
import statistics

import pytest
from conftest import EXPERIMENT

from retina.config import TrialSettings
from retina.report import strategy_verdict
from retina.selection import TrialRecord


@pytest.fixture(scope="module")
def report(tmp_path_factory, evaluated_sweep):
    """The store of the shared evaluated sweep, and `retina report` run on it once."""
    store = evaluated_sweep
    out = tmp_path_factory.mktemp("report")
    result = store.retina("report", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return store, out / "report.html"


def test_report_is_one_html_page_with_its_figures_embedded(report):
    _, page = report
    html = page.read_text()

    assert html.startswith("<!DOCTYPE html>")
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    # Four figures of the sweep and the champion's example test predictions.
    assert len(images) == 5
    assert all(len(image) > 1000 for image in images)
    assert not re.search(r'(src|href)="(?!data:)[^"#]', html)  # nothing fetched from elsewhere
    for heading in ("by optimizer", "Learning rate against validation F1",
                    "Learning curves of the best runs", "Example test predictions"):  # fmt: skip
        assert heading in html


def test_report_answers_whether_the_strategies_were_comparable_from_test_metrics(report):
    store, page = report
    html = page.read_text()
    by_strategy: dict[str, list[float]] = {}
    for run in store.best["runs"]:
        by_strategy.setdefault(run["strategy"], []).append(run["test"]["test_f1"])

    assert "Were the two final-training strategies comparable?" in html
    for strategy, values in by_strategy.items():
        mean, std = statistics.fmean(values), statistics.stdev(values)
        assert f"{strategy} {mean:.3f} ± {std:.3f} (2 runs)" in html
    assert "they were comparable" in html or "was better by" in html


def test_report_marks_the_champion_and_shows_its_test_report(report):
    store, page = report
    html = page.read_text()
    champion = store.best["champion"]

    assert f"retina-vessels v{champion['version']} @champion" in html
    assert f"Test report of run {champion['run_id']}" in html
    assert "inside the field of view, threshold 0.5" in html


def test_report_figures_are_logged_to_the_sweeps_parent_run(report):
    store, _ = report
    client = store.client
    experiment = client.get_experiment_by_name(EXPERIMENT)
    parent = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`retina.role` = 'sweep'"
    )[0]

    logged = {artifact.path for artifact in client.list_artifacts(parent.info.run_id, "report")}

    assert logged == {
        "report/validation_f1_boxes.png",
        "report/learning_rate_vs_validation_f1.png",
        "report/best_runs_learning_curves.png",
        "report/test_f1_by_strategy.png",
        "report/report.html",
    }


def _evaluated(strategy: str, seed: int, test_f1: float) -> TrialRecord:
    settings = TrialSettings(strategy=strategy, split_seed=seed)
    return TrialRecord(
        run_id=f"{strategy}{seed}",
        name=settings.run_name(),
        settings=settings,
        outcome="finished",
        metrics={"best_val_f1": 0.5, "test_f1": test_f1},
        parent_run_id=None,
    )


@pytest.mark.parametrize(
    ("retrain", "finetune", "answer"),
    [
        ((0.70, 0.74), (0.71, 0.73), "Yes, they were comparable"),
        ((0.80, 0.81), (0.60, 0.61), "No: retrain was better by 0.200"),
    ],
)
def test_strategy_verdict_weighs_the_gap_against_the_spread_over_split_seeds(
    retrain, finetune, answer
):
    evaluated = [_evaluated("retrain", seed, f1) for seed, f1 in enumerate(retrain)]
    evaluated += [_evaluated("finetune", seed, f1) for seed, f1 in enumerate(finetune)]

    assert answer in strategy_verdict(evaluated)


def test_strategy_verdict_without_evaluated_runs_says_how_to_get_them():
    assert "retina best --evaluate" in strategy_verdict([])
