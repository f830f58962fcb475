"""The ``retina`` command line: sweep, choose and evaluate, segment photos, report, browse.

retina sweep sweeps/quick.yaml --data-dir PATH
retina best --evaluate --register retina-vessels
retina predict photos/ --out vessels/
retina report
retina ui
"""

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from retina.errors import RetinaError

# MLflow's own download bars would interleave with retina's tables.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

app = typer.Typer(
    help="Sweep U-Net training choices for retinal vessel segmentation; compare in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Logs and CI captures are not terminals; give their tables room rather than 80 columns.
console = Console(width=None if sys.stdout.isatty() else 120)
errors = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
log = logging.getLogger("retina")

DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Dataset folder (HRF, DRIVE or images/labels/masks). Default: RETINA_DATA_DIR, "
        "else the folder recorded by the sweep, else HRF downloaded into the cache.",
        show_default=False,
    ),
]
FlipsOption = Annotated[
    bool | None,
    typer.Option(
        "--tta/--no-tta",
        help="Test-time augmentation: average the predictions of each photo and its "
        "flips. Default: what each run's settings chose (test_time_flips).",
        show_default=False,
    ),
]
TrackingOption = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        help="MLflow tracking URI. Default: MLFLOW_TRACKING_URI, else the SQLite store "
        "under ./mlflow/.",
        show_default=False,
    ),
]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=errors, show_path=False, rich_tracebacks=False)],
        force=True,
    )
    logging.getLogger("retina").setLevel(logging.DEBUG if verbose else logging.INFO)
    # MLflow announces each store it sets up; that is not news to the user.
    logging.getLogger("mlflow").setLevel(logging.WARNING)


def _fail(error: Exception) -> None:
    errors.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _tracking_uri(option: str | None) -> str:
    from retina.tracking import default_tracking_uri

    return option or default_tracking_uri()


def _load_dataset(data_dir: Path | None, resolution: int, recorded: str | None = None):
    """Load the dataset at ``resolution``, showing progress when photos are decoded."""
    from retina.data.dataset import load_dataset
    from retina.data.download import fetch_hrf

    folder = data_dir or os.environ.get("RETINA_DATA_DIR") or recorded
    if folder is None:
        log.info("no --data-dir or RETINA_DATA_DIR given: using the HRF download")
        folder = fetch_hrf(show_progress=console.is_terminal)
    columns = (TextColumn("preprocessing photos"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=errors, transient=True) as progress:
        task = progress.add_task("preprocess", total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        return load_dataset(Path(folder), resolution, on_case_done=advance)


@app.command()
def sweep(
    sweep_file: Annotated[Path, typer.Argument(help="Sweep file (YAML).")] = Path(
        "sweeps/quick.yaml"
    ),
    data_dir: DataDirOption = None,
    tracking_uri: TrackingOption = None,
    experiment: Annotated[
        str | None, typer.Option(help="MLflow experiment. Default: the sweep file's name.")
    ] = None,
    max_concurrent: Annotated[
        int | None, typer.Option(help="Trials at once. Default: the sweep file's, else all.")
    ] = None,
    cpus_per_trial: Annotated[float | None, typer.Option(help="CPUs per trial.")] = None,
    gpus_per_trial: Annotated[
        float | None, typer.Option(help="GPUs per trial; fractions share a GPU.")
    ] = None,
    workers_per_trial: Annotated[
        int | None, typer.Option(help="Data-parallel (DDP) workers per trial.")
    ] = None,
    storage: Annotated[
        str,
        typer.Option(
            help="Where Ray keeps trial results and checkpoints: a folder, or on a cluster "
            "shared storage (an NFS path, s3://..., gs://...)."
        ),
    ] = "ray_results",
    address: Annotated[
        str | None, typer.Option(help="Ray cluster to join (e.g. 10.0.0.1:6379).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted sweep.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run a sweep of U-Net trainings with Ray Tune, recording every trial in MLflow."""
    _setup_logging(verbose)
    try:
        from retina.config import TrialSettings, load_sweep_file
        from retina.sweep.runner import SweepRequest, existing_sweep, run_sweep
        from retina.tracking import connect

        spec = load_sweep_file(sweep_file)
        request = SweepRequest(
            sweep_file=sweep_file,
            spec=spec,
            experiment=experiment or sweep_file.stem,
            tracking_uri=_tracking_uri(tracking_uri),
            storage=storage if "://" in storage else str(Path(storage).expanduser().resolve()),
            resume=resume,
            address=address,
            max_concurrent=max_concurrent,
            cpus_per_trial=cpus_per_trial,
            gpus_per_trial=gpus_per_trial,
            workers_per_trial=workers_per_trial,
        )
        if existing_sweep(request) and not resume:
            raise RetinaError(
                f"a sweep named {request.experiment!r} already exists in {request.sweep_path}; "
                "pass --resume to continue it, or --experiment NAME to start another"
            )
        connect(request.tracking_uri)
        resolution = TrialSettings.model_validate(spec.fixed).resolution
        dataset = _load_dataset(data_dir, resolution)
        log.info(
            "sweep %s: %d grid points x %d samples, %d photos (%s) at %dx%d, tracking %s",
            request.experiment,
            spec.grid_size() // spec.num_samples,
            spec.num_samples,
            len(dataset),
            dataset.layout,
            resolution,
            resolution,
            request.tracking_uri,
        )
        outcome = run_sweep(request, dataset, errors)
    except RetinaError as error:
        _fail(error)
    trials = _print_sweep_summary(
        request.experiment, outcome, request.tracking_uri, not outcome.interrupted
    )
    if outcome.interrupted:
        raise typer.Exit(code=130)
    if not any(trial.outcome == "finished" for trial in trials):
        errors.print("[bold red]error:[/] no trial of the sweep finished; see the reasons above")
        raise typer.Exit(code=1)


def _print_sweep_summary(experiment: str, outcome, uri: str, complete: bool) -> list:
    from retina.sweep.runner import summarize_trials
    from retina.tracking import connect

    trials = summarize_trials(connect(uri), outcome.experiment_id, outcome.parent_run_id)
    table = Table(title=f"sweep {experiment}: {len(trials)} trials", title_justify="left")
    table.add_column("trial (optimizer-lr-split-strategy)", no_wrap=True)
    for column in ("outcome", "best val F1", "best epoch"):
        table.add_column(column, justify="right")
    table.add_column("reason")
    for trial in trials:
        score = "-" if trial.best_val_f1 is None else f"{trial.best_val_f1:.4f}"
        epoch = "-" if trial.best_epoch is None else str(trial.best_epoch)
        table.add_row(trial.name, trial.outcome, score, epoch, trial.reason)
    console.print(table)
    # An interrupted sweep has just printed how to resume; evaluating comes after that.
    following = (
        "next: [bold]retina best --evaluate[/], or [bold]retina ui[/] to browse."
        if complete
        else "browse it with [bold]retina ui[/]."
    )
    console.print(
        f"MLflow experiment [bold]{experiment}[/] (parent run {outcome.parent_run_id}); "
        + following
    )
    return trials


@app.command()
def best(
    experiment: Annotated[
        str | None, typer.Option(help="Sweep experiment. Default: the latest sweep.")
    ] = None,
    metric: Annotated[str, typer.Option(help="Validation metric to rank by.")] = "best_val_f1",
    top: Annotated[int, typer.Option(help="How many runs and configurations to list.")] = 10,
    evaluate: Annotated[
        bool, typer.Option("--evaluate", help="Score the chosen configuration on test photos.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    tta: FlipsOption = None,
    ensemble: Annotated[
        int,
        typer.Option(
            "--ensemble",
            metavar="K",
            min=0,
            help="With --evaluate: also score the mean prediction of the K runs with the "
            "best validation metric that share the best run's test photos.",
        ),
    ] = 0,
    native: Annotated[
        bool,
        typer.Option(
            "--native/--no-native",
            help="With --evaluate: also score at each photo's own size against its "
            "original label and mask (reads the original files).",
        ),
    ] = True,
    register: Annotated[
        str | None,
        typer.Option(
            "--register",
            metavar="NAME",
            help="With --evaluate: register the evaluated run with the best validation "
            "metric as a new version of model NAME (e.g. retina-vessels, what `retina "
            "predict` uses) and point the alias 'champion' at it.",
            show_default=False,
        ),
    ] = None,
    data_dir: DataDirOption = None,
    tracking_uri: TrackingOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """List the best runs and configurations by validation results; evaluate the winner."""
    _setup_logging(verbose)
    if not metric.startswith(("best_val_", "val_")):
        _fail(RetinaError(f"--metric {metric}: choose a validation metric (best_val_*)"))
    if register is not None and not evaluate:
        _fail(
            RetinaError("--register NAME needs --evaluate: a champion comes with its test report")
        )
    if ensemble and not evaluate:
        _fail(RetinaError("--ensemble K needs --evaluate: an ensemble is scored on test photos"))
    choices = EvaluationChoices(test_time_flips=tta, ensemble=ensemble, native=native)
    try:
        uri = _tracking_uri(tracking_uri)
        result = _best(experiment, metric, top, evaluate, register, data_dir, uri, choices)
    except RetinaError as error:
        _fail(error)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")


@dataclass(frozen=True)
class EvaluationChoices:
    test_time_flips: bool | None = None
    ensemble: int = 0
    native: bool = True


def _best(experiment, metric, top, evaluate, register, data_dir, uri, choices) -> dict:
    from retina.evaluation import (
        ensemble_members,
        evaluate_ensemble,
        evaluate_run,
        record_ensemble,
        record_evaluation,
    )
    from retina.selection import (
        choose_configuration,
        describe,
        latest_sweep_experiment,
        load_trials,
        rank_configurations,
        rank_runs,
    )
    from retina.tracking import connect, find_experiment, find_sweep_run

    client = connect(uri)
    experiment = experiment or latest_sweep_experiment(client, uri)
    records = load_trials(client, uri, experiment)
    runs = rank_runs(records, metric, top)
    configurations = rank_configurations(records, metric)
    chosen = choose_configuration(configurations)
    quiet = "--json" in sys.argv
    if not quiet:
        _print_rankings(experiment, metric, runs, configurations[:top])

    result = {
        "experiment": experiment,
        "metric": metric,
        "configuration": describe(chosen.settings),
        "configuration_score": {
            "mean": chosen.mean,
            "std": chosen.std,
            "std_over": chosen.std_over,
        },
        "split_seeds": chosen.split_seeds,
        "runs": [
            {
                "run_id": r.run_id,
                "name": r.name,
                "split_seed": r.settings.split_seed,
                "strategy": r.settings.strategy,
                "outcome": r.outcome,
                metric: r.metrics.get(metric),
            }
            for r in chosen.runs
        ],
    }
    if not evaluate:
        return result

    experiment_id = find_experiment(client, uri, experiment)
    sweep_run = find_sweep_run(client, experiment_id)
    recorded = sweep_run.data.params if sweep_run else {}
    dataset = _load_dataset(data_dir, chosen.settings.resolution, recorded.get("data_source"))
    if recorded.get("data_fingerprint") not in (None, dataset.fingerprint):
        log.warning("the data differ from the sweep's (fingerprint); splits follow photo names")

    evaluations, store = {}, {}
    for record in chosen.evaluable_runs:
        log.info("evaluating %s on its test photos", record.name)
        evaluation = evaluate_run(
            record, dataset, uri, choices.test_time_flips, choices.native, store
        )
        record_evaluation(client, evaluation)
        evaluations[record.run_id] = evaluation
        if not quiet:
            console.print(evaluation.report_text, highlight=False)
            console.print()
    for entry in result["runs"]:
        if entry["run_id"] in evaluations:
            evaluation = evaluations[entry["run_id"]]
            entry["test"] = evaluation.metrics
            entry["test_photos"] = evaluation.test_photos
            entry["photo_scores"] = evaluation.photo_scores
            entry["report"] = evaluation.reports
    shown = [evaluations[r.run_id] for r in chosen.evaluable_runs]
    if choices.ensemble:
        members = ensemble_members(records, metric, choices.ensemble)
        log.info("evaluating the ensemble of %s", ", ".join(r.name for r in members))
        combined = evaluate_ensemble(
            members, dataset, uri, choices.test_time_flips, choices.native, store
        )
        if sweep_run is not None:
            record_ensemble(client, sweep_run.info.run_id, combined, members)
        result["ensemble"] = {
            "members": [{"run_id": r.run_id, "name": r.name} for r in members],
            "threshold": combined.threshold,
            "test": combined.metrics,
            "test_photos": combined.test_photos,
            "photo_scores": combined.photo_scores,
        }
        shown.append(combined)
    result["strategies"] = _strategy_summary(chosen.evaluable_runs, evaluations)
    if not quiet:
        _print_test_quality(shown, choices.native)
        _print_strategies(result["strategies"], choices.native)
    if register is not None:
        result["champion"] = _register_champion(
            register, chosen.evaluable_runs, evaluations, experiment, metric, uri
        )
    return result


def _register_champion(name, records, evaluations, experiment, metric, uri) -> dict:
    """Register the evaluated run with the best validation metric as the champion."""
    from retina.evaluation import choose_champion, register_champion
    from retina.prediction import CHAMPION_ALIAS

    record = choose_champion([r for r in records if r.run_id in evaluations], metric)
    version = register_champion(uri, name, record, evaluations[record.run_id], experiment, metric)
    if "--json" not in sys.argv:
        console.print(
            f"registered [bold]{record.name}[/] (run {record.run_id}, {metric} "
            f"{record.metrics.get(metric, float('nan')):.4f}) as model [bold]{name}[/] version "
            f"{version.version}, alias @{CHAMPION_ALIAS}; "
            f"next: [bold]retina predict PHOTOS --model {name}[/]"
        )
    return {
        "name": name,
        "version": version.version,
        "alias": CHAMPION_ALIAS,
        "run_id": record.run_id,
        "run_name": record.name,
        metric: record.metrics.get(metric),
    }


def _strategy_summary(records, evaluations) -> dict:
    from retina.evaluation import HEADLINE_SCORES

    summary = {}
    for strategy in sorted({r.settings.strategy for r in records}):
        members = [
            evaluations[r.run_id].metrics for r in records if r.settings.strategy == strategy
        ]
        summary[strategy] = {"runs": len(members)}
        for key in (*HEADLINE_SCORES, "test_accuracy"):
            values = [m[key] for m in members if not math.isnan(m.get(key, math.nan))]
            if not values:
                continue
            summary[strategy][f"{key}_mean"] = statistics.fmean(values)
            summary[strategy][f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return summary


def _print_test_quality(evaluations, native: bool) -> None:
    """Per evaluated run: the scores the field compares, at the validation threshold."""
    flips = {bool(e.metrics["test_time_flips"]) for e in evaluations}
    table = Table(
        title="test photos inside the field of view, at each run's validation threshold"
        + (", flip-averaged" if flips == {True} else ""),
        title_justify="left",
    )
    columns = ["run", "photos", "thr.", "F1", "F1 per photo"]
    columns += ["native F1", "native per photo"] if native else []
    table.add_column(columns[0], overflow="fold")  # run names tell split and strategy apart
    for column in (*columns[1:], "MCC", "AUC", "AUC-PR"):
        table.add_column(column)

    def spread(m, prefix):
        return f"{m[f'{prefix}_photo_f1_mean']:.4f}±{m[f'{prefix}_photo_f1_std']:.4f}"

    for evaluation in evaluations:
        m = evaluation.metrics
        cells = [
            evaluation.name,
            str(len(evaluation.test_photos)),
            f"{evaluation.threshold:.3f}",
            f"{m['test_f1_at_val_threshold']:.4f}",
            spread(m, "test"),
        ]
        if native:
            cells += [f"{m['test_native_f1_at_val_threshold']:.4f}", spread(m, "test_native")]
        areas = ("test_mcc_at_val_threshold", "test_auc", "test_auc_pr")
        cells += [f"{m[key]:.4f}" for key in areas]
        table.add_row(*cells)
    console.print(table)


def _print_rankings(experiment, metric, runs, configurations) -> None:
    table = Table(title=f"top runs of {experiment} by {metric}", title_justify="left")
    for column in ("run", "outcome", metric, "best epoch", "run id"):
        table.add_column(column)
    for r in runs:
        table.add_row(
            r.name,
            r.outcome,
            f"{r.metrics[metric]:.4f}",
            str(int(r.metrics.get("best_epoch", 0))),
            r.run_id,
        )
    console.print(table)
    table = Table(
        title=f"configurations by mean {metric} over split seeds (validation only)",
        title_justify="left",
    )
    for column in ("#", "optimizer", "lr", "batch", "epochs", "seeds", "mean", "std", "std over"):
        table.add_column(column)
    for rank, score in enumerate(configurations, start=1):
        s = score.settings
        table.add_row(
            str(rank),
            s.optimizer,
            f"{s.learning_rate:.1e}",
            str(s.batch_size),
            str(s.epochs),
            ",".join(map(str, score.split_seeds)),
            f"{score.mean:.4f}",
            f"{score.std:.4f}" if score.std_over else "-",
            score.std_over or "one seed",
        )
    console.print(table)


def _print_strategies(summary: dict, native: bool) -> None:
    table = Table(
        title="final-training strategies of the chosen configuration, on test photos inside "
        "the field of view (mean ± std over its runs: split seeds and weight seeds)",
        title_justify="left",
    )
    shown = {
        "test_f1_at_val_threshold": "F1 at val thr.",
        "test_native_f1_at_val_threshold": "F1 native",
        "test_mcc_at_val_threshold": "MCC",
        "test_auc": "AUC",
        "test_f1": "F1 at 0.5",
        "test_f1_image": "F1 at 0.5, image",
    }
    if not native:
        del shown["test_native_f1_at_val_threshold"]
    for column in ("strategy", "runs", *shown.values()):
        table.add_column(column)
    for strategy, values in summary.items():
        cells = [f"{values[f'{key}_mean']:.4f} ± {values[f'{key}_std']:.4f}" for key in shown]
        table.add_row(strategy, str(values["runs"]), *cells)
    console.print(table)


@app.command()
def predict(
    images: Annotated[
        list[Path], typer.Argument(help="Fundus photos, or folders of them, of any size.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for the outputs.")],
    run: Annotated[
        str | None,
        typer.Option("--run", metavar="RUN_ID", help="Use this run's final model."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            metavar="NAME[@ALIAS]",
            help="Use a registered model: NAME@ALIAS, NAME/VERSION, or NAME for its "
            "champion. Default: retina-vessels@champion (see `retina best --register`).",
            show_default=False,
        ),
    ] = None,
    masks: Annotated[
        Path | None,
        typer.Option(
            "--masks",
            metavar="DIR",
            help="Field-of-view masks, paired by stem (<stem> or HRF's <stem>_mask). "
            "Default: estimated from each photo.",
            show_default=False,
        ),
    ] = None,
    tta: FlipsOption = None,
    tracking_uri: TrackingOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Segment photos: a probability map, a vessel mask and an overlay per photo.

    Each photo is preprocessed as in training, predicted, and the probabilities resized
    back to its size and thresholded at the run's validation threshold.
    """
    _setup_logging(verbose)
    try:
        from retina.prediction import find_photos, load_vessel_model, predict_photos

        photos = find_photos(images)
        uri = _tracking_uri(tracking_uri)
        vessel_model = load_vessel_model(uri, run_id=run, model=model)
        if tta is not None:
            flipped = vessel_model.settings.with_test_time_flips(tta)
            vessel_model = dataclasses.replace(vessel_model, settings=flipped)
        columns = (TextColumn("segmenting photos"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, TimeElapsedColumn(), console=errors, transient=True) as progress:
            task = progress.add_task("predict", total=len(photos))
            predictions = predict_photos(
                vessel_model,
                photos,
                out,
                masks_dir=masks,
                on_photo_done=lambda done, total: progress.update(task, completed=done),
            )
    except RetinaError as error:
        _fail(error)

    s = vessel_model.settings
    console.print(
        f"model {vessel_model.source} (run {vessel_model.run_id}): photos resized to "
        f"{s.resolution}x{s.resolution}, vessels at probability >= {vessel_model.threshold:.3f}"
        + (" (averaged over flips)" if s.test_time_flips else ""),
        highlight=False,
    )
    table = Table(title=f"{len(predictions)} photos segmented", title_justify="left")
    for column in ("photo", "size", "field of view", "vessels in FOV"):
        table.add_column(column)
    for prediction in predictions:
        table.add_row(
            prediction.photo.name,
            f"{prediction.width}x{prediction.height}",
            Path(prediction.field_of_view_source).name,
            f"{prediction.vessel_fraction:.1%}",
        )
    console.print(table)
    console.print(f"wrote <stem>_probability.png, _vessels.png and _overlay.png to {out}")


@app.command()
def report(
    experiment: Annotated[
        str | None, typer.Option(help="Sweep experiment. Default: the latest sweep.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            metavar="DIR",
            help="Folder for report.html. Default: reports/<experiment>.",
            show_default=False,
        ),
    ] = None,
    tracking_uri: TrackingOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Write a sweep's results as one HTML page and log its figures to the sweep's run."""
    _setup_logging(verbose)
    try:
        from retina.report import build_report, log_report, write_report
        from retina.selection import latest_sweep_experiment
        from retina.tracking import connect

        uri = _tracking_uri(tracking_uri)
        client = connect(uri)
        experiment = experiment or latest_sweep_experiment(client, uri)
        sweep_report = build_report(client, uri, experiment)
        path = write_report(sweep_report, out or Path("reports") / experiment)
        log_report(client, sweep_report)
    except RetinaError as error:
        _fail(error)
    console.print(f"report of sweep [bold]{experiment}[/] written to {path}", highlight=False)
    if sweep_report.parent_run_id:
        console.print(
            f"its {len(sweep_report.figures)} figures are logged to the sweep's run "
            f"{sweep_report.parent_run_id} under report/",
            highlight=False,
        )


@app.command()
def ui(
    tracking_uri: TrackingOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5000,
) -> None:
    """Serve the MLflow UI for the tracking store (local only by default)."""
    uri = _tracking_uri(tracking_uri)
    console.print(f"MLflow UI for {uri} at http://{host}:{port} (Ctrl-C stops it)")
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    command += ["--host", host, "--port", str(port)]
    raise typer.Exit(_serve(command))


@app.command()
def server(
    host: Annotated[
        str, typer.Option(help="Address to listen on; 0.0.0.0 lets cluster nodes reach it.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5000,
    store: Annotated[
        Path, typer.Option(help="Folder of the tracking store (mlflow.db and artifacts/).")
    ] = Path("mlflow"),
    allowed_hosts: Annotated[
        str | None,
        typer.Option(help="Host headers to accept, comma-separated (MLflow's own guard)."),
    ] = None,
) -> None:
    """Serve the tracking store to every node of a cluster, artifacts proxied through it.

    Trials on any node then log with --tracking-uri http://HOST:PORT.
    """
    store = store.expanduser().resolve()
    (store / "artifacts").mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "mlflow", "server"]
    command += ["--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}"]
    command += ["--artifacts-destination", str(store / "artifacts"), "--serve-artifacts"]
    command += ["--host", host, "--port", str(port)]
    if allowed_hosts:
        command += ["--allowed-hosts", allowed_hosts]
    console.print(f"MLflow tracking server for {store} at http://{host}:{port} (Ctrl-C stops)")
    raise typer.Exit(_serve(command))


def _serve(command: list[str]) -> int:
    """Run an MLflow server until it ends, or until Ctrl-C or SIGTERM stop it and every
    process it started (MLflow runs its web workers as children of its own)."""
    server = subprocess.Popen(command, start_new_session=True)
    stop_requested: list[float] = []

    def request_stop(*_) -> None:
        if not stop_requested:
            stop_requested.append(time.monotonic())
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    # Poll rather than block in wait(), so the handlers above can always run.
    while server.poll() is None:
        time.sleep(0.2)
        if stop_requested and time.monotonic() - stop_requested[0] > 10:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
    return 0 if stop_requested else server.returncode


if __name__ == "__main__":
    app()
