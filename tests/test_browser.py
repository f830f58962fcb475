"""`retina ui` in a real headless Chromium: a sweep's runs, params and F1 are on screen.

Needs Debian's chromium (`apt-get install -y chromium`) and the `playwright` package
(the `dev` extra); `.ci/run` installs both. Without them the test fails, naming them.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import EXPERIMENT

CHROMIUM = Path("/usr/bin/chromium")
# Headless, and nothing that reaches beyond 127.0.0.1: no updates, sync or QUIC probes.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
UI_START_SECONDS = 120  # MLflow's server takes 20-40 s to start on a busy 2-core machine
PAGE_SECONDS = 60


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_healthy(base: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + UI_START_SECONDS
    while True:
        assert server.poll() is None, server.stdout.read()[-3000:]
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"retina ui did not answer in {UI_START_SECONDS} s"
        time.sleep(1)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[dev]' (see .ci/run)")
    if not CHROMIUM.exists() and shutil.which("chromium") is None:
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (see .ci/run)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def ui(evaluated_sweep):
    """`retina ui` serving the shared evaluated sweep's store on a free local port."""
    store = evaluated_sweep
    port = _free_port()
    # A session of its own: `mlflow ui` and its workers are children of `retina ui`, and
    # only a signal to the whole group stops them all.
    server = subprocess.Popen(
        [sys.executable, "-m", "retina.cli", "ui", "--port", str(port)],
        cwd=store.work, env=store.env, text=True, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(base, server)
        yield store, base
    finally:
        _stop_group(server)


def _stop_group(server: subprocess.Popen) -> None:
    """Stop a server and every process it started, by their process group."""
    os.killpg(server.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)  # workers that outlived the polite request
    server.wait(timeout=30)


def test_experiment_page_lists_every_trial_run_of_the_sweep(ui, browser):
    store, base = ui
    experiment = store.client.get_experiment_by_name(EXPERIMENT)
    page = browser.new_page(viewport={"width": 1600, "height": 1000})

    page.goto(f"{base}/#/experiments/{experiment.experiment_id}/runs")
    # Trials are child runs, folded under the sweep's parent run until it is expanded.
    parent = page.locator('[role="row"]').filter(has_text=EXPERIMENT).first
    parent.wait_for(timeout=PAGE_SECONDS * 1000)
    parent.locator('[col-id="attributes.`Run Name`"] button').first.click()

    for run in store.best["runs"]:
        page.get_by_text(run["name"], exact=True).wait_for(timeout=PAGE_SECONDS * 1000)
    page.close()


def test_compare_view_shows_two_runs_with_their_params_and_best_val_f1(ui, browser):
    store, base = ui
    experiment = store.client.get_experiment_by_name(EXPERIMENT)
    runs = sorted(store.best["runs"], key=lambda run: run["split_seed"])[::3][:2]
    assert {run["split_seed"] for run in runs} == {0, 1}
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    query = urllib.parse.urlencode(
        {
            "runs": json.dumps([run["run_id"] for run in runs]),
            "experiments": json.dumps([experiment.experiment_id]),
        }
    )

    page.goto(f"{base}/#/compare-runs?{query}")

    metric = page.get_by_text("best_val_f1", exact=True).first
    metric.wait_for(timeout=PAGE_SECONDS * 1000)
    for run in runs:
        page.get_by_text(run["name"], exact=True).wait_for(timeout=PAGE_SECONDS * 1000)
    rows = [row.split("\t") for row in page.locator("tr").all_inner_texts()]
    params = {row[0]: row[1:] for row in rows if len(row) == 3}
    assert params["optimizer"] == ["adamw", "adamw"]
    assert params["split_seed"] == ["0", "1"]
    assert params["resolution"] == ["64", "64"]
    # The metrics table is a virtual grid: a metric's values sit in cells at its name's
    # height, rounded by the UI to 3 decimals.
    top = metric.evaluate("name => name.parentElement.style.top")
    cells = page.locator(
        f'.ReactVirtualized__Grid__innerScrollContainer > div[style*="top: {top};"]'
    ).all_inner_texts()
    shown = [float(cell) for cell in cells if cell != "best_val_f1"]
    assert shown == pytest.approx([run["best_val_f1"] for run in runs], abs=0.0006)
    page.close()
