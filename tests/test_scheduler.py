"""ASHA judges phase 1 only: the trials it keeps go through their whole phase 2."""

from pathlib import Path

from conftest import run_retina
from mlflow.tracking import MlflowClient

SWEEPS = Path(__file__).parent / "sweeps"


def test_asha_leaves_the_final_training_of_the_trials_it_keeps_alone(tmp_path, hrf_dir):
    result = run_retina(
        "sweep", str(SWEEPS / "asha_final.yaml"), "--data-dir", str(hrf_dir),
        "--storage", str(tmp_path / "ray"), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("asha_final").experiment_id
    runs = client.search_runs([experiment], filter_string="tags.`retina.role` = 'trial'")
    assert len(runs) == 4
    outcomes = {r.data.tags["retina.outcome"] for r in runs}
    assert "finished" in outcomes and outcomes <= {"finished", "stopped_early"}
    for run in runs:
        final = client.get_metric_history(run.info.run_id, "final_train_loss")
        if run.data.tags["retina.outcome"] == "finished":
            best_epoch = int(run.data.metrics["best_epoch"])
            length = 3 if run.data.params["strategy"] == "finetune" else best_epoch
            assert sorted(m.step for m in final) == list(range(1, length + 1))
        else:
            assert final == []  # stopped in phase 1, before any final training
