"""Choose the best configuration of a sweep from validation results alone.

Both final-training strategies consume the validation split, so validation cannot rank
them. A configuration (every setting but the split seed, the weight seed and the
strategy) is scored by its phase-1 validation metric, averaged first over the runs of
one split seed and then over split seeds; the test split plays no part in the choice.
"""

import statistics
from dataclasses import dataclass, field

from mlflow.tracking import MlflowClient

from retina.config import NOT_CONFIGURATION, TrialSettings
from retina.errors import TrackingError
from retina.tracking import TAG_OUTCOME, TAG_PARENT, TAG_ROLE, find_experiment


@dataclass(frozen=True)
class TrialRecord:
    """A trial's MLflow run as selection sees it."""

    run_id: str
    name: str
    settings: TrialSettings
    outcome: str
    metrics: dict[str, float]
    parent_run_id: str | None

    @property
    def has_final_model(self) -> bool:
        return self.outcome == "finished"


@dataclass
class ConfigurationScore:
    key: str
    settings: TrialSettings  # one member's settings, to describe the configuration
    mean: float
    std: float
    split_seeds: list[int]
    runs: list[TrialRecord] = field(default_factory=list)
    # What std spreads over: split seeds, the weight seeds of a single split (a fixed
    # split, or one split seed run with several seeds), or nothing (None) when neither
    # varies.
    std_over: str | None = "split seeds"

    @property
    def evaluable_runs(self) -> list[TrialRecord]:
        return [run for run in self.runs if run.has_final_model]


def latest_sweep_experiment(client: MlflowClient, uri: str) -> str:
    """The experiment of the most recently started sweep in the store."""
    experiments = client.search_experiments()
    runs = client.search_runs(
        [e.experiment_id for e in experiments] or ["0"],
        filter_string=f"tags.`{TAG_ROLE}` = 'sweep'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise TrackingError(f"no sweep found in {uri}; run `retina sweep` first")
    return client.get_experiment(runs[0].info.experiment_id).name


def load_trials(client: MlflowClient, uri: str, experiment: str) -> list[TrialRecord]:
    experiment_id = find_experiment(client, uri, experiment)
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'trial'", max_results=50000
    )
    records = []
    for run in runs:
        try:
            settings = TrialSettings.from_params(run.data.params)
        except ValueError:
            continue  # a run from an older retina whose params no longer validate
        records.append(
            TrialRecord(
                run_id=run.info.run_id,
                name=run.info.run_name,
                settings=settings,
                outcome=run.data.tags.get(TAG_OUTCOME, run.info.status.lower()),
                metrics=dict(run.data.metrics),
                parent_run_id=run.data.tags.get(TAG_PARENT),
            )
        )
    if not any(metric_present(record, "best_val_f1") for record in records):
        raise TrackingError(f"experiment {experiment!r} in {uri} has no trial with results yet")
    return records


def metric_present(record: TrialRecord, metric: str) -> bool:
    return metric in record.metrics


def rank_runs(records: list[TrialRecord], metric: str, top: int) -> list[TrialRecord]:
    scored = [record for record in records if metric_present(record, metric)]
    if not scored:
        raise TrackingError(f"no run has the metric {metric!r}")
    return sorted(scored, key=lambda record: record.metrics[metric], reverse=True)[:top]


def rank_configurations(records: list[TrialRecord], metric: str) -> list[ConfigurationScore]:
    """Configurations by their mean validation metric over split seeds, best first."""
    groups: dict[str, list[TrialRecord]] = {}
    for record in records:
        groups.setdefault(record.settings.configuration_key, []).append(record)

    scores = []
    for key, members in groups.items():
        per_seed: dict[int, list[float]] = {}
        for record in members:
            if metric_present(record, metric):
                per_seed.setdefault(record.settings.split_seed, []).append(record.metrics[metric])
        if not per_seed:
            continue
        seed_means = [statistics.fmean(values) for values in per_seed.values()]
        spread, std_over = seed_means, "split seeds"
        if len(seed_means) == 1:
            # One split: the spread left to show is over weight seeds (runs of one weight
            # seed that differ only in strategy share phase 1, so they count once).
            per_weight_seed: dict[int, list[float]] = {}
            for record in members:
                if metric_present(record, metric):
                    per_weight_seed.setdefault(record.settings.seed, []).append(
                        record.metrics[metric]
                    )
            spread = [statistics.fmean(values) for values in per_weight_seed.values()]
            std_over = "weight seeds" if len(spread) > 1 else None
        scores.append(
            ConfigurationScore(
                key=key,
                settings=members[0].settings,
                mean=statistics.fmean(seed_means),
                std=statistics.stdev(spread) if len(spread) > 1 else 0.0,
                split_seeds=sorted(per_seed),
                runs=sorted(members, key=lambda r: (r.settings.strategy, r.settings.split_seed)),
                std_over=std_over,
            )
        )
    return sorted(scores, key=lambda score: score.mean, reverse=True)


def choose_configuration(scores: list[ConfigurationScore]) -> ConfigurationScore:
    """The best-scoring configuration that has at least one final model to evaluate."""
    for score in scores:
        if score.evaluable_runs:
            return score
    raise TrackingError("no configuration has a finished run with a final model")


def describe(settings: TrialSettings) -> dict[str, object]:
    """The settings that tell configurations apart in tables and JSON."""
    return settings.model_dump(exclude=NOT_CONFIGURATION)
