"""The driver closes the MLflow runs of trials that could not close their own."""

from types import SimpleNamespace

from mlflow.tracking import MlflowClient

from retina.sweep.monitor import RunFinisher


def _running_trial_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("sweep", artifact_location=(tmp_path / "a").as_uri())
    run = client.create_run(experiment, tags={"retina.trial_id": "t1", "retina.role": "trial"})
    for epoch in (1, 2, 3):
        for key, value in {"train_loss": 1 / epoch, "val_loss": 1 / epoch}.items():
            client.log_metric(run.info.run_id, key, value, step=epoch)
        client.log_metric(run.info.run_id, "val_f1", 0.2 * epoch, step=epoch)
        client.log_metric(run.info.run_id, "val_auc", 0.5 + 0.1 * epoch, step=epoch)
    return uri, client, experiment, run.info.run_id


def test_a_trial_stopped_by_the_scheduler_ends_finished_with_its_curves(tmp_path):
    uri, client, experiment, run_id = _running_trial_run(tmp_path)
    trial = SimpleNamespace(trial_id="t1", last_result={"mlflow_run_id": run_id})
    RunFinisher(uri, experiment).on_trial_complete(3, [trial], trial)

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["retina.outcome"] == "stopped_early"
    assert "learning_curves.png" in {a.path for a in client.list_artifacts(run_id)}


def test_a_crashed_trial_is_found_by_its_trial_id_and_ends_failed(tmp_path):
    uri, client, experiment, run_id = _running_trial_run(tmp_path)
    trial = SimpleNamespace(trial_id="t1", last_result={}, error_file="/tmp/error.txt")
    RunFinisher(uri, experiment).on_trial_error(3, [trial], trial)

    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["retina.outcome"] == "failed"
    assert "error.txt" in run.data.tags["retina.failure"]


def test_a_run_that_finished_itself_is_left_alone(tmp_path):
    uri, client, experiment, run_id = _running_trial_run(tmp_path)
    client.set_tag(run_id, "retina.outcome", "finished")
    client.set_terminated(run_id, "FINISHED")
    trial = SimpleNamespace(trial_id="t1", last_result={"mlflow_run_id": run_id})
    RunFinisher(uri, experiment).on_trial_complete(3, [trial], trial)
    assert client.get_run(run_id).data.tags["retina.outcome"] == "finished"
