"""The findings report of the tiny run: one HTML page per run, every task in it, opened in Chromium."""

import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.helpers import ARTIFACTS, Chromium

pytestmark = pytest.mark.ray


def test_report_shows_every_task(tracked_run, mlflow_server, tmp_path):
    results, _ = tracked_run
    folder = Path(results.results["train"].crosscoder).parents[1] / "analyse"
    report = folder / "report.html"
    text = report.read_text()
    tasks = list(results.results["attribute"].tasks)
    assert all(f'<h2 id="{t}">' in text for t in tasks) and "Ablation check" in text
    assert text.count("data:image/png;base64,") >= 1 + len(tasks)  # plots inlined: one self-contained file
    assert "stands for" in text  # the selection reasons
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("crossray-toy").experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{results.mlflow_run_id}' and "
                                            "tags.`crossray.stage` = 'analyse'")
    assert "analyse/report.html" in [f.path for f in client.list_artifacts(runs[0].info.run_id, "analyse")]
    assert "report.html" in [f.path for f in client.list_artifacts(results.mlflow_run_id)]
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    browser = Chromium(exe, tmp_path / "profile")
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=report.as_uri())
        browser.wait_for("document.querySelectorAll('h2').length > 1")
        shown = browser.eval("[...document.querySelectorAll('h2')].map(h => h.innerText)")
        assert set(tasks) <= set(shown)
        assert browser.eval("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
        browser.screenshot(ARTIFACTS / "report.png")
    finally:
        browser.close()
