"""Scale out: a real two-node Ray cluster on 127.0.0.1 logging to a real `retina server`."""

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

SWEEPS = Path(__file__).parent / "sweeps"
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Ray's token authentication, shared by the nodes and every sweep's driver.
CLUSTER_ENV = {
    **os.environ,
    "RAY_AUTH_MODE": "token",
    "RAY_AUTH_TOKEN": secrets.token_hex(32),
    "RAY_USAGE_STATS_ENABLED": "0",
}


def _retina(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "retina.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
        env=CLUSTER_ENV,
    )


def _stop_ray_processes_under(temp_dir: str) -> None:
    """Stop the Ray processes of this test's cluster only (those whose command line names
    its temp dir, and their children). `ray stop` would also stop every other Ray runtime
    of the user on the machine, such as a sweep running beside the tests."""
    ours = []
    for process in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in process.info["cmdline"] or []):
            ours.append(process)
            with contextlib.suppress(psutil.Error):
                ours.extend(process.children(recursive=True))
    for process in ours:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(ours, timeout=15)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


@pytest.fixture(scope="module")
def two_node_cluster():
    """`ray start --head` and a second `ray start --address`, one CPU each."""
    port = _free_port()
    env = CLUSTER_ENV
    # A short folder of its own (Ray's socket paths must stay short), so that teardown
    # can find this cluster's processes and no other's.
    temp_dir = tempfile.mkdtemp(prefix="rtc", dir="/tmp")
    common = [
        "--num-cpus=1",
        "--node-ip-address=127.0.0.1",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
    ]
    try:
        subprocess.run(
            [RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
            check=True,
            capture_output=True,
            env=env,
        )
        subprocess.run(
            [RAY, "start", f"--address=127.0.0.1:{port}", *common],
            check=True,
            capture_output=True,
            env=env,
        )
        yield f"127.0.0.1:{port}"
    finally:
        _stop_ray_processes_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def tracking_server(tmp_path):
    """`retina server` on 127.0.0.1 with artifacts proxied through it."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "retina.cli", "server", "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                break
        except OSError:
            assert server.poll() is None, "retina server exited"
            assert time.monotonic() < deadline, "retina server did not answer in 90 s"
            time.sleep(1)
    yield uri
    server.terminate()
    server.wait(timeout=30)


def test_sweep_runs_on_both_nodes_and_logs_through_the_server(
    tmp_path, hrf_dir, two_node_cluster, tracking_server
):
    sweep = _retina(
        "sweep", str(SWEEPS / "two_nodes.yaml"), "--data-dir", str(hrf_dir),
        "--address", two_node_cluster, "--tracking-uri", tracking_server,
        "--storage", f"file://{tmp_path / 'shared-storage'}",
        cwd=tmp_path,
    )  # fmt: skip
    assert sweep.returncode == 0, sweep.stderr[-3000:]

    client = MlflowClient(tracking_server)
    experiment = client.get_experiment_by_name("two_nodes")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    trials = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`retina.role` = 'trial'"
    )
    assert len(trials) == 2
    assert len({run.data.tags["retina.node_id"] for run in trials}) == 2
    assert all(run.info.status == "FINISHED" for run in trials)
    # Artifacts went through the server into the store folder beside it.
    assert list((tmp_path / "mlflow" / "artifacts").rglob("learning_curves.png"))
    assert not list((tmp_path / "shared-storage").rglob("mlruns"))

    best = _retina("best", "--evaluate", "--json", "--tracking-uri", tracking_server, cwd=tmp_path)
    assert best.returncode == 0, best.stderr[-3000:]
    report = json.loads(best.stdout)
    assert all("test" in run for run in report["runs"])
    assert client.get_run(trials[0].info.run_id).data.tags.get("retina.evaluated") == "true"


def test_local_tracking_store_is_refused_on_a_cluster(tmp_path, hrf_dir, two_node_cluster):
    result = _retina(
        "sweep", str(SWEEPS / "two_nodes.yaml"), "--data-dir", str(hrf_dir),
        "--address", two_node_cluster, "--storage", f"file://{tmp_path / 'shared'}",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert "is local to this machine but the Ray cluster has 2 nodes" in result.stderr
    assert "retina server" in result.stderr


def test_local_storage_path_is_refused_on_a_cluster(
    tmp_path, hrf_dir, two_node_cluster, tracking_server
):
    result = _retina(
        "sweep", str(SWEEPS / "two_nodes.yaml"), "--data-dir", str(hrf_dir),
        "--address", two_node_cluster, "--tracking-uri", tracking_server,
        "--storage", str(tmp_path / "local"),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert "must be shared storage" in result.stderr
