"""A sweep's results as one self-contained HTML page, and as figures on its parent run.

The page shows what a reader of a sweep asks first: how optimizers, learning rates and
final-training strategies compare on validation photos, how the best runs learned, and,
once `retina best --evaluate` has run, how the evaluated models did on their untouched
test photos, with a sentence on whether the two final-training strategies were
comparable. Figures are embedded as base64 PNG, so the page is one file to send.
"""

import base64
import html
import io
import logging
import math
import statistics
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from retina.evaluation import HEADLINE_SCORES
from retina.prediction import CHAMPION_ALIAS
from retina.selection import (
    ConfigurationScore,
    TrialRecord,
    describe,
    load_trials,
    rank_configurations,
)
from retina.tracking import RunRecorder, find_experiment, find_sweep_run

log = logging.getLogger(__name__)

METRIC = "best_val_f1"  # phase-1 validation F1 in the field of view: what selection ranks by
REPORT_FOLDER = "report"  # artifact folder of the figures and page on the parent run
CURVE_RUNS = 4  # learning curves drawn, best first
CURVE_METRICS = ("val_f1", "train_loss", "val_loss")
TEST_COLUMNS = HEADLINE_SCORES


@dataclass
class Champion:
    """The registered model version that carries the champion alias."""

    name: str
    version: str
    run_id: str


@dataclass
class SweepReport:
    """The page and the figures it embeds (file name to PNG bytes)."""

    experiment: str
    parent_run_id: str | None
    html: str
    figures: dict[str, bytes] = field(default_factory=dict)


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _seed_values(score: ConfigurationScore, strategy: str | None = None) -> dict[int, float]:
    """One value per split seed: the mean of the configuration's runs with that seed."""
    per_seed: dict[int, list[float]] = {}
    for record in score.runs:
        if METRIC in record.metrics and strategy in (None, record.settings.strategy):
            per_seed.setdefault(record.settings.split_seed, []).append(record.metrics[METRIC])
    return {seed: statistics.fmean(values) for seed, values in sorted(per_seed.items())}


def _boxes(axes, groups: dict[str, dict[int, float]], title: str) -> None:
    """A box per group over split seeds, with each seed's value drawn as a point."""
    names = list(groups)
    axes.boxplot([list(groups[name].values()) for name in names], widths=0.5, showcaps=False)
    axes.set_xticks(range(1, len(names) + 1), names)
    for position, name in enumerate(names, start=1):
        seeds = list(groups[name])
        values = list(groups[name].values())
        axes.scatter([position] * len(values), values, color="tab:red", zorder=3, s=18)
        for seed, value in zip(seeds, values, strict=True):
            axes.annotate(
                f"seed {seed}",
                (position, value),
                xytext=(6, 0),
                textcoords="offset points",
                fontsize=7,
                va="center",
            )
    axes.set_title(title, fontsize=10)
    axes.set_ylabel("validation F1 (field of view)")


def validation_boxes_figure(configurations: list[ConfigurationScore]) -> Figure:
    """Validation F1 by optimizer and by final-training strategy, across split seeds.

    Each optimizer is shown at its best configuration (learning rate and the rest), and
    each strategy at the chosen configuration, so a box spreads over split seeds only.
    """
    by_optimizer: dict[str, dict[int, float]] = {}
    for score in configurations:  # best first: the first seen is each optimizer's best
        by_optimizer.setdefault(score.settings.optimizer, _seed_values(score))
    chosen = configurations[0]
    strategies = sorted({record.settings.strategy for record in chosen.runs})
    by_strategy = {strategy: _seed_values(chosen, strategy) for strategy in strategies}
    by_strategy = {strategy: values for strategy, values in by_strategy.items() if values}

    figure = Figure(figsize=(11, 4.2))
    left, right = figure.subplots(1, 2)
    _boxes(left, by_optimizer, "by optimizer (each at its best configuration)")
    _boxes(right, by_strategy, "by final-training strategy (chosen configuration)")
    figure.tight_layout()
    return figure


def learning_rate_figure(configurations: list[ConfigurationScore]) -> Figure:
    """Validation F1 against learning rate, one colour per optimizer, a point per seed."""
    figure = Figure(figsize=(7, 4.2))
    axes = figure.subplots()
    optimizers = sorted({score.settings.optimizer for score in configurations})
    for optimizer in optimizers:
        rates, values, means = [], [], {}
        for score in configurations:
            if score.settings.optimizer != optimizer:
                continue
            seed_values = list(_seed_values(score).values())
            rates += [score.settings.learning_rate] * len(seed_values)
            values += seed_values
            means.setdefault(score.settings.learning_rate, []).append(score.mean)
        line = axes.plot(rates, values, "o", alpha=0.6, label=optimizer)[0]
        ordered = sorted(means)
        axes.plot(ordered, [max(means[rate]) for rate in ordered], color=line.get_color())
    axes.set_xscale("log")
    axes.set_xlabel("learning rate")
    axes.set_ylabel("validation F1 (field of view)")
    axes.set_title("learning rate against validation F1 (line: best mean per rate)", fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def _curve_runs(records: list[TrialRecord]) -> list[TrialRecord]:
    """The best runs by validation F1, one per configuration and split seed.

    The strategies of one split seed share phase 1, so their curves would coincide.
    """
    chosen, seen = [], set()
    for record in sorted(records, key=lambda r: (-r.metrics.get(METRIC, -1.0), r.name)):
        key = (record.settings.configuration_key, record.settings.split_seed)
        if METRIC in record.metrics and key not in seen:
            seen.add(key)
            chosen.append(record)
    return chosen[:CURVE_RUNS]


def best_runs_curves_figure(
    runs: list[TrialRecord], histories: dict[str, dict[str, list[tuple[int, float]]]]
) -> Figure:
    """Validation F1 and the losses per phase-1 epoch of the best runs."""
    figure = Figure(figsize=(11, 4.2))
    scores, losses = figure.subplots(1, 2)
    for record in runs:
        history = histories[record.run_id]
        if not history["val_f1"] or not history["train_loss"]:
            continue  # a run from before per-epoch metrics were logged
        label = record.name.rsplit("-", 1)[0]  # the strategy does not change phase 1
        line = scores.plot(*zip(*history["val_f1"], strict=True), label=label)[0]
        colour = line.get_color()
        losses.plot(*zip(*history["train_loss"], strict=True), color=colour, label=label)
        if history["val_loss"]:
            losses.plot(*zip(*history["val_loss"], strict=True), color=colour, linestyle="--")
    scores.set_xlabel("epoch")
    scores.set_ylabel("validation F1 (field of view)")
    scores.set_title("best runs: validation F1 per epoch", fontsize=10)
    scores.legend(fontsize=8)
    losses.set_xlabel("epoch")
    losses.set_ylabel("loss")
    losses.set_title("training loss (solid) and validation loss (dashed)", fontsize=10)
    figure.tight_layout()
    return figure


def strategy_test_f1_figure(evaluated: list[TrialRecord]) -> Figure:
    """Test F1 of the evaluated runs by final-training strategy, a point per split seed."""
    groups: dict[str, dict[int, float]] = {}
    for record in evaluated:
        groups.setdefault(record.settings.strategy, {})[record.settings.split_seed] = (
            record.metrics["test_f1"]
        )
    figure = Figure(figsize=(6, 4.2))
    axes = figure.subplots()
    _boxes(axes, dict(sorted(groups.items())), "test F1 by final-training strategy")
    axes.set_ylabel("test F1 (field of view, threshold 0.5)")
    figure.tight_layout()
    return figure


def strategy_verdict(evaluated: list[TrialRecord]) -> str:
    """One sentence: were the final-training strategies comparable on test photos?"""
    if not evaluated:
        return (
            "No run of this sweep has been scored on test photos yet, so the final-training "
            "strategies cannot be compared; run `retina best --evaluate`."
        )
    groups: dict[str, list[float]] = {}
    for record in evaluated:
        groups.setdefault(record.settings.strategy, []).append(record.metrics["test_f1"])
    summary = {
        strategy: (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        for strategy, values in sorted(groups.items())
    }
    parts = [
        f"{strategy} {mean:.3f} ± {std:.3f} ({len(groups[strategy])} runs)"
        for strategy, (mean, std) in summary.items()
    ]
    described = "Test F1 (field of view, threshold 0.5, mean ± std over runs): " + (
        "; ".join(parts)
    )
    if len(summary) < 2:
        return f"{described}. Only one strategy was evaluated, so there is nothing to compare."
    best = max(summary, key=lambda s: summary[s][0])
    worst = min(summary, key=lambda s: summary[s][0])
    gap = summary[best][0] - summary[worst][0]
    if any(len(values) < 2 for values in groups.values()):
        return (
            f"{described}. {best} leads {worst} by {gap:.3f}, but with a single run per "
            "strategy the spread is unknown, so this does not show whether they differ."
        )
    # The difference of two independent means varies by about the root of the summed
    # variances; a gap within that is what another draw of split seeds could reverse.
    spread = float(np.hypot(summary[best][1], summary[worst][1]))
    if gap <= spread:
        return (
            f"{described}. Yes, they were comparable: the gap of {gap:.3f} is within the "
            f"spread over runs ({spread:.3f})."
        )
    return (
        f"{described}. No: {best} was better by {gap:.3f}, more than the spread over runs "
        f"({spread:.3f})."
    )


def find_champion(client: MlflowClient, run_ids: list[str]) -> Champion | None:
    """The registered version among these runs' that holds the champion alias, if any."""
    for run_id in run_ids:
        try:
            versions = client.search_model_versions(f"run_id = '{run_id}'")
        except MlflowException:
            return None  # a store without a model registry
        for found in versions:
            # Searches leave aliases out; reading the version gives its current ones.
            version = client.get_model_version(found.name, found.version)
            if CHAMPION_ALIAS in version.aliases:
                return Champion(version.name, str(version.version), run_id)
    return None


def _artifact(client: MlflowClient, run_id: str, path: str) -> bytes | None:
    with tempfile.TemporaryDirectory() as folder:
        try:
            local = client.download_artifacts(run_id, path, folder)
        except (MlflowException, OSError):
            return None
        return Path(local).read_bytes()


def _parent_run_id(client: MlflowClient, uri: str, experiment: str) -> str | None:
    sweep_run = find_sweep_run(client, find_experiment(client, uri, experiment))
    return sweep_run.info.run_id if sweep_run else None


def _histories(client: MlflowClient, runs: list[TrialRecord]) -> dict[str, dict]:
    return {
        record.run_id: {
            key: [(m.step, m.value) for m in client.get_metric_history(record.run_id, key)]
            for key in CURVE_METRICS
        }
        for record in runs
    }


def _evaluated_for_verdict(
    configurations: list[ConfigurationScore], evaluated: list[TrialRecord]
) -> list[TrialRecord]:
    """The evaluated runs of the best configuration that has any, so the strategies are
    compared within one configuration even if several were evaluated."""
    evaluated_ids = {record.run_id for record in evaluated}
    for score in configurations:
        members = [record for record in score.runs if record.run_id in evaluated_ids]
        if members:
            return members
    return []


def build_report(client: MlflowClient, uri: str, experiment: str) -> SweepReport:
    """Read a sweep's runs from MLflow and lay out its page and figures."""
    records = load_trials(client, uri, experiment)
    configurations = rank_configurations(records, METRIC)
    evaluated = sorted(
        (record for record in records if "test_f1" in record.metrics),
        key=lambda record: (record.settings.strategy, record.settings.split_seed, record.name),
    )
    curve_runs = _curve_runs(records)

    figures = {
        "validation_f1_boxes.png": _png(validation_boxes_figure(configurations)),
        "learning_rate_vs_validation_f1.png": _png(learning_rate_figure(configurations)),
        "best_runs_learning_curves.png": _png(
            best_runs_curves_figure(curve_runs, _histories(client, curve_runs))
        ),
    }
    if evaluated:
        figures["test_f1_by_strategy.png"] = _png(strategy_test_f1_figure(evaluated))

    champion = find_champion(client, [record.run_id for record in evaluated])
    shown = champion.run_id if champion else (evaluated[0].run_id if evaluated else None)
    examples = _artifact(client, shown, "test_predictions.png") if shown else None
    test_report = _artifact(client, shown, "test_report.txt") if shown else None

    page = _page(
        experiment=experiment,
        uri=uri,
        records=records,
        chosen=configurations[0],
        evaluated=evaluated,
        verdict=strategy_verdict(_evaluated_for_verdict(configurations, evaluated)),
        champion=champion,
        shown_run=shown,
        test_report=test_report.decode() if test_report else None,
        figures=figures,
        examples=examples,
    )
    return SweepReport(experiment, _parent_run_id(client, uri, experiment), page, figures)


def write_report(report: SweepReport, out_dir: Path) -> Path:
    """Write the page as ``report.html`` in ``out_dir``; returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.html"
    path.write_text(report.html, encoding="utf-8")
    return path


def log_report(client: MlflowClient, report: SweepReport) -> None:
    """Log the figures and the page to the sweep's parent run, under ``report/``."""
    if report.parent_run_id is None:
        log.warning("experiment %s has no parent run; figures not logged", report.experiment)
        return
    recorder = RunRecorder(client, report.parent_run_id)
    with tempfile.TemporaryDirectory() as folder:
        for name, png in report.figures.items():
            (Path(folder) / name).write_bytes(png)
            recorder.log_artifact(Path(folder) / name, REPORT_FOLDER)
        (Path(folder) / "report.html").write_text(report.html, encoding="utf-8")
        recorder.log_artifact(Path(folder) / "report.html", REPORT_FOLDER)


def _image(png: bytes, alt: str) -> str:
    encoded = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{encoded}" alt="{html.escape(alt)}">'


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _without_password(uri: str) -> str:
    """A tracking URI fit to print: a server's user name and password left out."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    return parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")).geturl()


def _number(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4f}"


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
.verdict { font-size: 1.05em; background: #f3f6fa; padding: 0.8em; border-left: 4px solid #36c; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
"""


def _page(
    experiment: str,
    uri: str,
    records: list[TrialRecord],
    chosen: ConfigurationScore,
    evaluated: list[TrialRecord],
    verdict: str,
    champion: Champion | None,
    shown_run: str | None,
    test_report: str | None,
    figures: dict[str, bytes],
    examples: bytes | None,
) -> str:
    outcomes: dict[str, int] = {}
    for record in records:
        outcomes[record.outcome] = outcomes.get(record.outcome, 0) + 1
    counted = ", ".join(f"{count} {outcome}" for outcome, count in sorted(outcomes.items()))
    settings = describe(chosen.settings)
    choice = ", ".join(f"{key} {value}" for key, value in settings.items())
    created = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    spread = f" ± {chosen.std:.4f} (spread over {chosen.std_over})" if chosen.std_over else ""
    escape = html.escape

    parts = [
        f"<h1>Sweep {escape(experiment)}</h1>",
        f"<p>{len(records)} trials ({escape(counted)}) in {escape(_without_password(uri))}; "
        f"page written "
        f"{created}.</p>",
        "<h2>Chosen configuration (validation only)</h2>",
        f"<p>Mean {METRIC} {chosen.mean:.4f}{spread}, split seeds "
        f"{escape(', '.join(map(str, chosen.split_seeds)))}: {escape(choice)}.</p>",
        "<h2>Validation F1 by optimizer and by final-training strategy</h2>",
        "<p>Phase-1 validation F1, one point per split seed. The strategies of one split "
        "seed share phase 1, so their boxes are alike by design; the test photos below "
        "tell them apart.</p>",
        _image(figures["validation_f1_boxes.png"], "validation F1 box plots"),
        "<h2>Learning rate against validation F1</h2>",
        _image(figures["learning_rate_vs_validation_f1.png"], "learning rate against F1"),
        "<h2>Learning curves of the best runs</h2>",
        _image(figures["best_runs_learning_curves.png"], "learning curves"),
        "<h2>Test photos</h2>",
        f'<p class="verdict">Were the two final-training strategies comparable? '
        f"{escape(verdict)}</p>",
    ]
    if evaluated:
        header = ["run", "strategy", "split seed", METRIC, *TEST_COLUMNS, "champion"]
        rows = [
            [
                record.name,
                record.settings.strategy,
                str(record.settings.split_seed),
                _number(record.metrics.get(METRIC)),
                *(_number(record.metrics.get(key)) for key in TEST_COLUMNS),
                f"{champion.name} v{champion.version} @{CHAMPION_ALIAS}"
                if champion and champion.run_id == record.run_id
                else "",
            ]
            for record in evaluated
        ]
        parts.append(_table(header, rows))
        parts.append(_image(figures["test_f1_by_strategy.png"], "test F1 by strategy"))
        if champion is None:
            parts.append(
                "<p>No champion is registered; `retina best --evaluate --register NAME` "
                "registers one. Shown below: the first evaluated run.</p>"
            )
        else:
            parts.append(
                f"<p>Champion: model {escape(champion.name)} version {champion.version} "
                f"(@{CHAMPION_ALIAS}), run {escape(champion.run_id)}.</p>"
            )
        if test_report:
            parts.append(f"<h2>Test report of run {escape(shown_run or '')}</h2>")
            parts.append(f"<pre>{escape(test_report)}</pre>")
        if examples:
            parts.append("<h2>Example test predictions</h2>")
            parts.append(
                "<p>White: vessel found; red: vessel missed; blue: false vessel.</p>"
                + _image(examples, "example test predictions")
            )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>retina sweep {escape(experiment)}</title><style>{STYLE}</style></head>"
        f"<body>{''.join(parts)}</body></html>\n"
    )
