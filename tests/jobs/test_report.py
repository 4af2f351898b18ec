"""The findings report of the tiny run: one HTML page per run, every task in it, opened in Chromium."""

from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.helpers import ARTIFACTS, chromium_page

pytestmark = pytest.mark.ray


def test_report_shows_every_task(tracked_run, mlflow_server, tmp_path):
    results, *_ = tracked_run
    folder = Path(results.train.crosscoder).parents[1] / "analyse"
    report = folder / "report.html"
    text = report.read_text()
    tasks = list(results.attribute.tasks)
    assert all(f'<h2 id="{t}">' in text for t in tasks) and "Ablation check" in text
    assert "(crossray method)" in text and "the paper's 2-way ρ" in text  # the method, both rho forms
    assert text.count("data:image/png;base64,") >= 1 + len(tasks)  # plots inlined: one self-contained file
    assert "stands for" in text  # the selection reasons
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("crossray-toy").experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{results.mlflow_run_id}' and "
                                            "tags.`crossray.stage` = 'analyse'")
    assert "analyse/report.html" in [f.path for f in client.list_artifacts(runs[0].info.run_id, "analyse")]
    assert "report.html" in [f.path for f in client.list_artifacts(results.mlflow_run_id)]
    with chromium_page(report.as_uri(), tmp_path / "profile") as browser:
        browser.wait_for("document.querySelectorAll('h2').length > 1")
        shown = browser.eval("[...document.querySelectorAll('h2')].map(h => h.innerText)")
        assert set(tasks) <= set(shown)
        assert browser.eval("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
        browser.screenshot(ARTIFACTS / "report.png")


def test_tiny_config_finds_the_dip_and_agrees_with_ablation(tracked_run, mlflow_server, mlflow_root):
    """configs/tiny.yaml as the demo runs it (the session's tracked run; its summary is what
    `crossray run --json` prints): the checkpoint set holds the nearest-noun dip of agreement across a
    prepositional phrase and the phase where it is learned, the ablation check agrees with RelIE on
    every toy task, and the MLflow artifact store stays lean: no activation shard, no training state, a
    few MB in all."""
    results, _, summary = tracked_run
    assert set(summary) == {"run", "method", "mlflow_run_id", "registered", "revisions", "stages", "devices",
                            "screen", "checkpoints", "l0", "dead_latents", "tasks"}
    assert summary["method"] == "crossray"
    assert set(summary["checkpoints"][0]) == {"revision", "tokens_seen", "fve", "delta_ce", "ce_recovered",
                                              "delta_ce_skip_pos0", "delta_ce_pos0"}
    assert all(c["delta_ce"] == c["delta_ce_skip_pos0"] for c in summary["checkpoints"])
    assert set(summary["tasks"]["agreement_across_pp"]) == {"examples", "ablation_rho", "ablation_rho_nway",
                                                             "ablation_rho_2way", "ablation_rho_pairs",
                                                             "selected"}
    pp = summary["screen"]["agreement_across_pp"]
    chosen = [pp[r] for r in summary["revisions"]]
    print(f"\ntiny: {summary['revisions']}, across-PP accuracy {chosen}, ablation rho "
          f"{ {t: round(i['ablation_rho'], 3) for t, i in summary['tasks'].items()} }")
    assert min(chosen) <= 0.25 and max(chosen) >= 0.9
    assert len(summary["tasks"]) == 6
    assert all(info["ablation_rho"] >= 0.8 for info in summary["tasks"].values()), summary["tasks"]
    # the artifacts of this run's parent and stage runs, and of its logged crosscoder
    client = MlflowClient(mlflow_server)
    parent = client.get_run(summary["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    ids = {parent.info.run_id, *(c.info.run_id for c in children),
           results.train.model_uri.removeprefix("models:/")}
    store = [p for p in (mlflow_root / "artifacts").rglob("*") if p.is_file() and ids & set(p.parts)]
    total = sum(p.stat().st_size for p in store)
    print(f"MLflow artifact store: {len(store)} files, {total / 1e6:.1f} MB")
    assert any(p.name == "weights.safetensors" for p in store) and total < 25e6
    assert not [p for p in store if p.name.startswith("shard-") or p.name == "train_state.safetensors"]
    # the chosen set ends at the final model (selection keeps it)
    assert summary["revisions"][-1] == max(summary["screen"]["agreement_across_pp"], key=_step)


def _step(revision: str) -> int:
    return int(revision.removeprefix("step"))
