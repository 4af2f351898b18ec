"""Each stage re-runs only when what it reads changes, and nothing stale is ever reused.

The session's light run (`light_chain`, tests/conftest.py) in one folder, changed one setting at a
time (the tests run in file order, each from the previous one's state); the stage status comes from
the run's JSON summary.
"""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from crossray.store import load_crosscoder

pytestmark = pytest.mark.ray
STAGES = ["screen", "select", "extract", "train", "evaluate", "attribute", "analyse"]


def _ran(*names):
    return {s: "ran" if s in names else "reused" for s in STAGES}


def test_first_run_runs_every_stage(light_chain):
    summary, outcome = light_chain.first
    assert summary["stages"] == _ran(*STAGES)
    assert summary["revisions"] == ["step0", "step128", "step1000"]
    assert summary["registered"] == "models:/toy-graph@champion"
    assert [c["revision"] for c in summary["checkpoints"]] == summary["revisions"]
    assert [c["tokens_seen"] for c in summary["checkpoints"]] == [0, 128 * 2048, 1000 * 2048]
    assert all(0 < c["fve"] <= 1 and c["delta_ce"] is not None for c in summary["checkpoints"])
    assert set(summary["screen"]["simple_agreement"]) == {"step0", "step64", "step128", "step1000"}
    assert summary["tasks"]["simple_agreement"]["examples"] == 200
    assert summary["l0"] > 0 and summary["dead_latents"] >= 0


def test_attribution_change_reruns_attribution_and_analysis(light_chain):
    before = json.loads((light_chain.root / "runs" / "tiny" / "train" / "done.json").read_text())
    summary, outcome = light_chain.run_it(attribution__steps=3)
    assert summary["stages"] == _ran("attribute", "analyse")
    client = MlflowClient(light_chain.uri)
    version = client.get_model_version_by_alias("toy-graph", "champion")
    assert str(version.version) == "1"  # a reused training stage registers no new version
    assert version.run_id == before["mlflow_run_id"]
    # the reused stages are linked from the new parent run to the runs that produced them
    children = client.search_runs([client.get_run(outcome.mlflow_run_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{outcome.mlflow_run_id}'")
    links = {r.data.tags["crossray.stage"]: r.data.tags.get("crossray.reused_from") for r in children}
    assert links["train"] == before["mlflow_run_id"] and links["attribute"] is None
    assert len(children) == 7


def test_held_out_change_reruns_evaluation_only(light_chain):
    summary, _ = light_chain.run_it(evaluate__eval_sequences=6)
    assert summary["stages"] == _ran("evaluate")
    assert summary["devices"] == dict.fromkeys(summary["stages"], "cpu")  # the reused ones: where they ran


def test_added_task_reruns_screen_attribution_analysis(light_chain, toy_dir):
    tasks = [str(toy_dir / "tasks" / f"{t}.jsonl") for t in ("simple_agreement", "agreement_across_pp")]
    summary, _ = light_chain.run_it(pipeline__tasks=tasks)
    assert summary["stages"] == _ran("screen", "select", "attribute", "analyse")
    assert set(summary["tasks"]) == set(summary["screen"]) == {"simple_agreement", "agreement_across_pp"}


def test_crosscoder_change_retrains_without_reextracting(light_chain):
    summary, outcome = light_chain.run_it(train__crosscoder__n_latents=64)
    assert summary["stages"] == _ran("train", "evaluate", "attribute", "analyse")
    assert load_crosscoder(outcome.train.crosscoder).cfg.n_latents == 64
    import pandas as pd

    effects = pd.read_parquet(Path(outcome.attribute.effects) / "effects.parquet")
    assert effects.feature.max() == 63  # attribution ran on the new crosscoder, not the stale one
    version = MlflowClient(light_chain.uri).get_model_version_by_alias("toy-graph", "champion")
    assert str(version.version) == "2"


def test_corpus_change_reextracts(light_chain):
    summary, outcome = light_chain.run_it(extract__corpus__n_sequences=112)
    assert summary["stages"] == _ran("extract", "train", "evaluate", "attribute", "analyse")
    assert outcome.extract.n_sequences == 112


@pytest.mark.slow  # the layer in every key: the corpus change shows extract onward, this adds screen
def test_layer_change_reruns_everything(light_chain):
    summary, outcome = light_chain.run_it(pipeline__layer=1)
    assert summary["stages"] == _ran(*STAGES)
    assert load_crosscoder(outcome.train.crosscoder).cfg.layer == 1


def test_unchanged_config_reruns_nothing(light_chain):
    """(The summary's format, from the CLI: test_report.py; a fresh process reusing stages:
    test_faults.py.)"""
    summary, _ = light_chain.run_it()
    assert summary["stages"] == _ran()


def test_serve_refuses_a_half_rerun_folder(light_chain, tmp_path):
    """A retrain killed during evaluation leaves the new crosscoder beside the old effects and feature
    tables: Serve refuses the folder, naming the stage, until the re-run has finished."""
    import shutil

    from crossray.results import ResultsError, load_folder

    folder = tmp_path / "tiny"
    shutil.copytree(light_chain.root / "runs" / "tiny", folder)
    assert load_folder(folder).revisions  # a finished run loads
    train = json.loads((folder / "train" / "done.json").read_text())
    (folder / "train" / "done.json").write_text(json.dumps({**train, "key": "0" * 16}))  # another crosscoder
    evaluate = (folder / "evaluate" / "done.json").read_text()
    (folder / "evaluate" / "done.json").unlink()  # killed while evaluating it
    with pytest.raises(ResultsError, match="stage evaluate is not finished"):
        load_folder(folder)
    (folder / "evaluate" / "done.json").write_text(evaluate)
    with pytest.raises(ResultsError, match=r"stage evaluate was made from another train \(key "):
        load_folder(folder)
