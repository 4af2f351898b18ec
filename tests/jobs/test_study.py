"""A study on Ray: the toy study shaped like the paper's Pythia study (three adjacent pairs and a
triple), screened once, each revision extracted once, every set trained by one Train job, evaluated,
attributed and compared; killed while training, it resumes every set from the joint checkpoint; a
failed set is reported while the others finish, and retried alone on a re-run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from crossray.config import load_config
from crossray.extract import Manifest
from crossray.pipeline.study import Study
from crossray.pipeline.study_report import study_summary
from crossray.store import RunLayout
from tests.helpers import ARTIFACTS, chromium_page, light_study_config

pytestmark = pytest.mark.ray
SETS = ["step64-step128", "step128-step256", "step256-step1000", "step128-step256-step1000"]


class FailOnce:
    """The Ray backend, whose attribution fails once for one set (as a crash there would)."""

    def __init__(self, backend, set_name: str):
        self.backend, self.set_name, self.failed = backend, set_name, False

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def attribute(self, crosscoder, *args, **kwargs):
        if f"/{self.set_name}/" in str(crosscoder) and not self.failed:
            self.failed = True
            raise RuntimeError("attribution actor died")
        return self.backend.attribute(crosscoder, *args, **kwargs)


def _killed_while_training(config: Path, cfg, address: str) -> None:
    """`crossray run` of the study in a process of its own, a driver joining the session's Ray cluster
    at `address`, SIGKILLed once the joint Train job has registered a checkpoint (Ray ends the dead
    driver's actors and Train workers; the cluster lives on, as a shared cluster does)."""
    import os
    import subprocess
    import sys
    import time

    from tests.helpers import kill_tree, registered_checkpoints

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PYTHONPATH=str(root), RAY_ADDRESS=address)
    storage = RunLayout.of(cfg.pipeline.out, cfg.pipeline.name).train_storage
    run = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", str(config)], env=env, cwd=root,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 400
    while time.time() < deadline and run.poll() is None and registered_checkpoints(storage) < 1:
        time.sleep(0.1)
    assert registered_checkpoints(storage) >= 1, f"no joint checkpoint (the run ended {run.poll()})"
    kill_tree(run.pid)
    run.wait()


@pytest.fixture(scope="module")
def study(ray_cluster, ray_address, toy_dir, tmp_path_factory):
    """The light toy study killed while training, resumed with its second set failing once in
    attribution: (config, uri, the resumed outcome). Its re-run: `rerun`."""
    from jobs.pipeline import RayBackend

    root = tmp_path_factory.mktemp("study")
    config = light_study_config(root, toy_dir)
    cfg = load_config(config)
    uri = f"sqlite:///{root}/runs/mlflow.db"
    (root / "runs").mkdir(exist_ok=True)
    _killed_while_training(config, cfg, ray_address)
    flaky = FailOnce(RayBackend(cfg), SETS[1])
    first = Study(cfg, flaky, "study.yaml", uri).run()
    return cfg, uri, first


@pytest.fixture(scope="module")
def rerun(study):
    """The resumed study run again: the re-run's outcome."""
    from jobs.pipeline import RayBackend

    cfg, uri, _ = study
    return Study(cfg, RayBackend(cfg), "study.yaml", uri).run()


def test_a_failed_set_is_reported_and_the_others_finish(study):
    _, _, first = study
    summary = study_summary(first)
    assert list(summary["sets"]) == SETS and summary["failed"] == [SETS[1]]
    assert summary["sets"][SETS[1]]["status"] == "failed" and "attribution actor died" in \
        summary["sets"][SETS[1]]["error"]
    for name in (SETS[0], *SETS[2:]):
        s = summary["sets"][name]
        assert s["status"] == "done" and set(s["stages"].values()) == {"ran"}
        assert all(0 < v <= 1 for v in s["fve"].values()) and list(s["fve"]) == s["revisions"]
    assert summary["stages"] == {"screen": "reused", "select": "reused", "extract": "reused"}  # killed run's
    assert summary["devices"] == dict.fromkeys(summary["stages"], "cpu")  # recorded when they ran
    assert summary["sets"][SETS[0]]["devices"] == dict.fromkeys(("train", "evaluate", "attribute", "analyse"),
                                                                "cpu")


def test_the_killed_study_resumed_every_set_from_the_joint_checkpoint(study):
    _, _, first = study
    for name in (SETS[0], *SETS[2:]):
        final = first.sets[name].train.final
        assert final["resumed_from_step"] > 0 and final["step"] == 120, final


def test_the_rerun_reuses_the_finished_sets_and_retries_the_failed_one(rerun):
    summary = study_summary(rerun)
    assert summary["failed"] == [] and summary["stages"] == dict.fromkeys(("screen", "select", "extract"),
                                                                           "reused")
    stages = {name: s["stages"] for name, s in summary["sets"].items()}
    assert stages[SETS[1]] == {"train": "reused", "evaluate": "reused", "attribute": "ran", "analyse": "ran"}
    assert all(set(stages[n].values()) == {"reused"} for n in (SETS[0], *SETS[2:]))
    json.dumps(summary)  # what `crossray run --json` prints


def test_each_revision_is_extracted_once_for_every_set(study, rerun):
    (cfg, _, _), again = study, rerun
    layout = RunLayout.of(cfg.pipeline.out, cfg.pipeline.name)
    manifest = Manifest.read(layout.acts)
    assert manifest.revisions == again.revisions == ["step64", "step128", "step256", "step1000"]
    counted = {r: sum(s["forward_sequences"][r] for s in manifest.shards) for r in manifest.revisions}
    assert counted == dict.fromkeys(manifest.revisions, cfg.extract.corpus.n_sequences)  # one pass each
    for name in SETS:  # no set extracted for itself: the shared stages live once, in the study folder
        set_layout = RunLayout(layout.set_root(name))
        assert set_layout.acts == layout.acts and not (layout.set_root(name) / "extract").exists()
        trained = json.loads((set_layout.crosscoder / "config.json").read_text())["crosscoder"]
        assert trained["revisions"] == name.split("-")
        assert trained["weight_hashes"] == [manifest.weight_hashes[manifest.revisions.index(r)]
                                            for r in name.split("-")]


def test_the_comparison_tables_and_report(study, rerun, tmp_path):
    (cfg, _, _), again = study, rerun
    layout = RunLayout.of(cfg.pipeline.out, cfg.pipeline.name)
    timeline = {(r["set"], r["revision"]): r for r in again.comparison["timeline"]}
    assert set(timeline) == {(n, r) for n in SETS for r in n.split("-")}
    assert all(r["ie_mass"] >= r["top_ie_mass"] >= 0 for r in timeline.values())
    pairs = {(r["set"], r["earlier"], r["later"]) for r in again.comparison["new_features"]}
    assert ("step128-step256-step1000", "step256", "step1000") in pairs and len(pairs) == 5
    matched = again.comparison["matched"]
    assert {(m["set_a"], m["set_b"], m["revision"]) for m in matched} >= {
        ("step64-step128", "step128-step256", "step128"),
        ("step256-step1000", "step128-step256-step1000", "step1000")}
    assert all(0 <= m["matched"] <= m["k"] and -1 <= m["mean_best_cosine"] <= 1 for m in matched)
    for name in ("timeline", "new_features", "matched"):
        assert all((layout.study_tables / f"{name}.{ext}").exists() for ext in ("parquet", "csv"))
    text = layout.study_report.read_text()
    assert all(f"sets/{n}/analyse/report.html" in text for n in SETS)
    with chromium_page(layout.study_report.as_uri(), tmp_path / "profile") as browser:
        browser.wait_for("document.querySelectorAll('h2').length > 1")
        assert browser.eval("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
        assert browser.eval("document.querySelectorAll('table').length") >= 2
        browser.screenshot(ARTIFACTS / "study.png")


def test_mlflow_holds_the_study_above_its_sets(study, rerun):
    (_, uri, _), again = study, rerun
    client = MlflowClient(uri)
    run = client.get_run(again.mlflow_run_id)
    assert "IE mass per checkpoint (timeline)" in run.data.tags["mlflow.note.content"]
    fve = again.sets[SETS[0]].evaluate.metrics["fve/step64"]
    assert run.data.metrics[f"fve/{SETS[0]}/step64"] == pytest.approx(fve)
    children = client.search_runs([run.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{again.mlflow_run_id}'")
    names = {c.info.run_name for c in children}
    assert set(SETS) <= names and {"screen", "select", "extract"} & names  # sets and shared stages
    parents = {c.info.run_name: c.info.run_id for c in children if c.info.run_name in SETS}
    for run_id in parents.values():
        stages = client.search_runs([run.info.experiment_id],
                                    filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
        assert {s.data.tags["crossray.stage"] for s in stages} >= {"train", "evaluate", "attribute",
                                                                   "analyse"}
        assert client.get_run(run_id).data.tags["crossray.study"] == "tiny-study"
    assert "study/study.html" in [f.path for f in client.list_artifacts(again.mlflow_run_id, "study")]
    served = RunLayout(Path(again.sets[SETS[0]].train.crosscoder).parents[1])  # a set reads like a run
    assert served.accuracy.exists() and served.effects.exists()


def test_serve_lists_the_study_and_the_page_switches_sets(study, rerun, tmp_path):
    """A study folder served: every set is a run, /studies gives the comparison, the page shows the
    timeline and switches between the study's sets."""
    import threading

    import uvicorn
    from fastapi.testclient import TestClient

    from serve.api import ServiceState, build_api
    from tests.helpers import free_port

    (cfg, _, _), again = study, rerun
    folder = RunLayout.of(cfg.pipeline.out, cfg.pipeline.name).root
    state = ServiceState([str(folder)], tmp_path / "cache")
    state.load()
    assert state.ready, state.error
    client = TestClient(build_api(state))
    assert sorted(r["id"] for r in client.get("/runs").json()) == sorted(f"tiny-study.{n}" for n in SETS)
    [listed] = client.get("/studies").json()
    assert listed["study"] == "tiny-study" and [s["name"] for s in listed["sets"]] == SETS
    detail = client.get("/studies/tiny-study").json()
    assert len(detail["timeline"]) == len(again.comparison["timeline"]) and detail["matched"]
    assert client.get("/studies/nope").status_code == 404
    assert client.get(f"/runs/tiny-study.{SETS[0]}/accuracy").status_code == 200  # a set reads as a run
    port = free_port()
    config = uvicorn.Config(build_api(state), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        with chromium_page(f"http://127.0.0.1:{port}/", tmp_path / "profile") as browser:
            browser.wait_for("document.querySelectorAll('#timeline tbody tr').length > 0")
            assert browser.eval("document.getElementById('study').value") == "tiny-study"
            assert browser.eval("document.querySelectorAll('#run option').length") == len(SETS)
            browser.eval("(() => { const s = document.getElementById('run');"
                         f" s.value = 'tiny-study.{SETS[3]}'; s.dispatchEvent(new Event('change')); }})()")
            browser.wait_for(f"document.querySelector('#timeline tr.sel td').innerText === '{SETS[3]}'")
            browser.screenshot(ARTIFACTS / "study-page.png")
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_set_is_served_from_mlflow_alone(study, rerun, tmp_path):
    """A set's MLflow run (or its registered crosscoder) loads like a plain run's: its own stages
    from its run, the shared ones from the study's."""
    import mlflow

    from crossray.results import load_run

    (_, uri, _), again = study, rerun
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        outcome = again.sets[SETS[2]]
        run = load_run(outcome.mlflow_run_id, tmp_path / "cache")
        assert run.id == outcome.mlflow_run_id and run.revisions == SETS[2].split("-")
        assert len(run.accuracy) and len(run.effects) and run.metrics["fve/step1000"] == pytest.approx(
            outcome.evaluate.metrics["fve/step1000"])
        assert load_run(outcome.registered["uri"], tmp_path / "cache2").id == outcome.mlflow_run_id
    finally:
        mlflow.set_tracking_uri(previous)
