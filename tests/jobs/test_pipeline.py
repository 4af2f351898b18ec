"""The pipeline against a real `mlflow server` on 127.0.0.1: runs, params, metrics, artifacts,
registry, lineage; a second run skips every stage; configs and bad input."""

import contextlib
import io
import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from crossray.config import load_config
from crossray.pipeline.runner import Pipeline
from crossray.pipeline.summary import summary_text
from crossray.store import STAGES
from crossray.tracking import check_tracking
from jobs.pipeline import run
from tests.helpers import free_port, light_pipeline_config

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.ray


def test_pipeline_tracked_in_mlflow(tracked_run, mlflow_server, tmp_path):
    results, config, _ = tracked_run
    text = summary_text(results)
    assert "FVE" in text and "models:/toy-test@champion" in text

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("crossray-toy")
    parent = client.get_run(results.mlflow_run_id)
    tags = parent.data.tags
    revisions = results.select.revisions
    assert tags["crossray.family"] == "toy" and tags["crossray.layer"] == "2"
    assert tags["crossray.revisions"] == ",".join(revisions) and len(revisions) == 3
    assert len(tags["crossray.weight_hashes"].split(",")) == 3 and len(tags["crossray.corpus_hash"]) == 64
    assert tags["crossray.manifest"] == results.extract.manifest_key
    assert tags["crossray.config"] == "tiny.yaml"  # a name, never a path of this machine
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_stage = {r.data.tags["crossray.stage"]: r for r in children}
    assert set(by_stage) == {"screen", "select", "extract", "train", "evaluate", "attribute", "analyse"}
    # where each stage ran: its MLflow run and the --json summary say so (no GPU here: the CPU)
    assert {s: r.data.tags["crossray.device"] for s, r in by_stage.items()} == dict.fromkeys(by_stage, "cpu")
    assert tracked_run[2]["devices"] == dict.fromkeys(STAGES, "cpu") and "devices: screen cpu" in text
    train = by_stage["train"]
    params = train.data.params
    assert params["train.n_steps"] == "1000" and params["train.crosscoder.n_latents"] == "512"
    history = client.get_metric_history(train.info.run_id, f"fve/{revisions[0]}")
    assert [m.step for m in history] == [100 * i for i in range(1, 11)]
    evaluate = by_stage["evaluate"].data.metrics  # one naming scheme: fve/<revision> everywhere
    assert all(0 < evaluate[f"fve/{r}"] <= 1 and f"delta_ce/{r}" in evaluate for r in revisions)
    # MLflow stays lean: the extraction's manifest, never its activation shards
    extract_files = [f.path for f in client.list_artifacts(by_stage["extract"].info.run_id, "extract/acts")]
    assert extract_files == ["extract/acts/manifest.json"]
    assert len(client.get_metric_history(by_stage["screen"].info.run_id, "accuracy/simple_agreement")) == 12
    # artifacts: open the tables and the PNGs
    from PIL import Image

    png = client.download_artifacts(by_stage["analyse"].info.run_id, "analyse/accuracy_curves.png",
                                    str(tmp_path))
    with Image.open(png) as im:
        assert im.size[0] > 300 and im.format == "PNG"
    effects = client.download_artifacts(by_stage["attribute"].info.run_id,
                                        "attribute/effects/effects.parquet", str(tmp_path))
    df = pd.read_parquet(effects)
    assert set(df.checkpoint) == set(revisions) and len(df) == 6 * 512 * 3
    weights = client.download_artifacts(train.info.run_id, "train/crosscoder", str(tmp_path / "cc"))
    assert (Path(weights) / "weights.safetensors").exists() and (Path(weights) / "config.json").exists()
    version = client.get_model_version_by_alias("toy-test", "champion")
    assert version.run_id == train.info.run_id and version.source == results.train.model_uri
    # a second run reuses every stage and logs no new stage runs
    again = run(load_config(config), config.name)
    assert again.mlflow_run_id == results.mlflow_run_id
    assert set(again.status.values()) == {"reused"}
    assert len(client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")) == 7


@pytest.fixture(scope="module")
def paper_stream_run(ray_cluster, light_chain, mlflow_server, toy_dir, tmp_path_factory):
    """`crossray run CONFIG --pipeline.method paper --extract.mode stream --json` (its `main`, on the
    session's Ray; a run in a process of its own: test_faults.py) on the light run's extraction,
    training and task: one run for two things, each checked on its own below. The
    normalisation keeps training's view of position 0 (set explicitly: the paper's default for it
    is checked in test_config.py), so the crosscoder is the Parquet run's (`light_chain.first`) but
    for the stream: (summary, run folder, config)."""
    import signal

    from jobs.cli import main

    tmp_path = tmp_path_factory.mktemp("paper-stream")
    config = light_pipeline_config(tmp_path, toy_dir, changes={
        "pipeline.name": "tiny-stream", "pipeline.screen_examples": 10,
        "pipeline.screen_revisions": ["step0", "step128", "step1000"], "extract.mode": "stream",
        "extract.norm_first_position": False, "launch.register_name": "toy-test-stream"})  # toy-test stays
    handler, previous = signal.getsignal(signal.SIGTERM), mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as out:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        try:
            code = main(["run", str(config), "--pipeline.method", "paper", "--json"])
        finally:  # the command's SIGTERM handler and MLflow's global URI are not for the rest of the session
            signal.signal(signal.SIGTERM, handler)
            mlflow.set_tracking_uri(previous)
    assert code == 0
    summary = json.loads(out.getvalue().strip().splitlines()[-1])
    return summary, tmp_path / "runs" / "tiny-stream", config


def test_stream_mode_writes_no_activation_and_matches_parquet(paper_stream_run, light_chain, mlflow_server):
    """`extract.mode: stream`: the extraction actors feed the Train worker, no activation shard is
    written anywhere, the held-out FVE is the Parquet run's, and the stream position marks every
    trained row once: 100 steps of 256 rows are 4.2 epochs of the 6,048 rows, and every item of the
    first four was trained, but for a shuffle buffer's worth still held at the end. (Two workers
    and restores: test_train_job.py.)"""
    from crossray.position import StreamPosition

    summary, folder, config = paper_stream_run
    _, parquet = light_chain.first
    extract = json.loads((folder / "extract" / "done.json").read_text())["result"]
    assert extract["mode"] == "stream" and extract["acts"] is None
    assert extract["token_count"] == parquet.extract.token_count
    written = [p.relative_to(folder) for p in folder.rglob("*") if p.is_file()]
    assert not [p for p in written if p.parts[0] == "extract" and p.name not in ("done.json", "started.json")]
    assert {p.parts[0] for p in written if p.suffix == ".parquet"} <= {"screen", "attribute", "analyse"}
    fve = {c["revision"]: (c["fve"], parquet.evaluate.metrics[f"fve/{c['revision']}"])
           for c in summary["checkpoints"]}
    print(f"\nheld-out FVE, stream and Parquet: "
          f"{ {r: tuple(round(v, 4) for v in f) for r, f in fve.items()} }")
    assert list(fve) == parquet.select.revisions
    for streamed, stored in fve.values():
        assert streamed == pytest.approx(stored, abs=0.02)
    position = StreamPosition.from_json(json.loads((folder / "train" / "stream_position.json").read_text()))
    assert position.rows == 100 * 256 and position.duplicate_rows == 0 and position.restores == 0
    epoch_items = position.plan.n_blocks  # (the items of one pass over the corpus)
    assert set(range(4 * epoch_items)) <= position.done | set(position.partial), "an item never came"
    buffer = load_config(config).train.shuffle_buffer_rows  # what a worker may still hold at the end:
    assert position.pending_rows() <= buffer + 256 + 2 * position.plan.item_rows(0)  # + a batch, 2 items
    contexts = pd.read_parquet(folder / "analyse" / "tables" / "top_contexts.parquet")
    assert len(contexts) > 100  # the scanned sequences were extracted again
    client = MlflowClient(mlflow_server)
    parent = client.get_run(summary["mlflow_run_id"])
    plan = json.loads(Path(client.download_artifacts(parent.info.run_id, "plan.json")).read_text())
    assert plan["mode"] == "stream" and plan["disk"]["activations"] == 0
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{summary['mlflow_run_id']}'")
    assert {c.data.tags["crossray.stage"] for c in children} >= {"extract", "train"}
    for child in children:  # no activation table and no optimizer state anywhere in MLflow
        stack = [f for f in client.list_artifacts(child.info.run_id)]
        while stack:
            f = stack.pop()
            assert "acts" not in Path(f.path).parts and not f.path.endswith("train_state.safetensors"), f.path
            stack += client.list_artifacts(child.info.run_id, f.path) if f.is_dir else []


def test_the_papers_method_is_the_headline(paper_stream_run, mlflow_server):
    """`--pipeline.method paper` (what is checked is the method, not the numbers): the summary says
    so and takes the paper's forms as its headline (ΔCE with position 0 spliced, the 2-way ablation
    rho), and the parent run records the method and both forms of each."""
    summary, _, _ = paper_stream_run
    assert summary["method"] == "paper"
    assert all(c["delta_ce"] == c["delta_ce_pos0"] and c["delta_ce_skip_pos0"] is not None
               for c in summary["checkpoints"])
    rhos = [t for t in summary["tasks"].values() if t["ablation_rho"] is not None]
    assert rhos and all(t["ablation_rho"] == t["ablation_rho_2way"] and len(t["ablation_rho_pairs"]) == 3
                        for t in rhos)
    run = MlflowClient(mlflow_server).get_run(summary["mlflow_run_id"]).data
    assert run.params["method"] == "paper"
    for rev in summary["revisions"]:
        assert {f"delta_ce/{rev}", f"delta_ce_pos0/{rev}"} <= set(run.metrics)
    assert any(k.startswith("ablation_rho/") for k in run.metrics)
    assert {k.replace("ablation_rho/", "ablation_rho_2way/") for k in run.metrics
            if k.startswith("ablation_rho/")} <= set(run.metrics)


def test_configs_parse_and_resolve():
    for name in ("tiny", "pythia-1b", "olmo-1b", "bloom-1b1"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        if name != "tiny":
            p = Pipeline(cfg, backend=None)  # resolves the hub family without touching the network
            assert len(cfg.pipeline.revisions) == 3 and not p.family.is_local
            labels = [p.family.revision(r).label for r in cfg.pipeline.revisions]
            assert labels[-1] in {"300B", "3048B", "341B"}
    bloom = load_config(ROOT / "configs" / "bloom-1b1.yaml").pipeline
    assert bloom.layer == 13 and bloom.tokenizer == "bigscience/bloom-1b1"


def test_bad_config_and_dead_server(tmp_path, monkeypatch):
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["train"]["n_step"] = 5
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=r"bad.yaml:train: unknown key\(s\) \['n_step'\]"):
        load_config(bad)
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["pipeline"]["layer"] = "two"
    bad.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=r"bad.yaml:pipeline.layer: expected int"):
        load_config(bad)
    port = free_port()  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(ValueError, match=f"tracking server http://127.0.0.1:{port} does not answer"):
            check_tracking()
    finally:
        mlflow.set_tracking_uri(previous)  # a global: later tests must not inherit the dead server


def _machine_paths(tmp_path) -> list[str]:
    import tempfile

    return [str(ROOT), str(Path.home()), tempfile.gettempdir(), str(tmp_path)]


def test_mlflow_as_a_researcher_uses_it(tracked_run, mlflow_server, toy_dir, tmp_path):
    """Parent run story, datasets as inputs, a loadable pyfunc crosscoder, lineage on the version."""
    import hashlib

    import numpy as np

    from crossray.extract import Manifest, read_shard
    from crossray.store import load_crosscoder

    results, *_ = tracked_run
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("crossray-toy")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    parent = client.get_run(results.mlflow_run_id)
    revisions = results.select.revisions
    note = parent.data.tags["mlflow.note.content"]
    assert "## Checkpoints" in note and all(r in note for r in revisions) and "ablation" in note
    metrics = parent.data.metrics
    for r in revisions:
        assert 0 < metrics[f"fve/{r}"] <= 1 and f"delta_ce/{r}" in metrics
    assert metrics["l0"] > 0 and "dead_latents" in metrics
    assert {f"ablation_rho/{t}" for t in results.attribute.tasks} <= set(metrics)
    assert parent.data.params["revisions"] == ",".join(revisions) and parent.data.params["layer"] == "2"
    assert "config.json" in [f.path for f in client.list_artifacts(parent.info.run_id)]
    # datasets as inputs of the stages that read them, with content digests and row counts
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_stage = {r.data.tags["crossray.stage"]: r for r in children}
    for stage in ("screen", "attribute"):
        inputs = {d.dataset.name: d.dataset for d in by_stage[stage].inputs.dataset_inputs}
        assert len(inputs) == 6
        digest = hashlib.sha256((toy_dir / "tasks" / "simple_agreement.jsonl").read_bytes()).hexdigest()
        assert digest.startswith(inputs["simple_agreement"].digest)
        assert json.loads(inputs["simple_agreement"].profile) == {"rows": 200}
    [corpus] = by_stage["extract"].inputs.dataset_inputs
    assert results.extract.corpus_hash.startswith(corpus.dataset.digest)
    assert json.loads(corpus.dataset.profile)["rows"] == results.extract.token_count
    for stage in ("extract", "train"):  # system metrics while the heavy stages ran
        assert any(k.startswith("system/cpu_utilization") for k in by_stage[stage].data.metrics)
    # the registered crosscoder loads with MLflow alone and encodes raw activations
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model("models:/toy-test@champion")
    acts = results.extract.acts
    _, _, x = read_shard(Manifest.read(acts).shard_paths(acts)[0])
    cc = load_crosscoder(results.train.crosscoder)
    want = cc.encode(cc.normalise(x[:256]), mode="eval").detach().numpy()
    np.testing.assert_allclose(model.predict(x[:256].numpy()), want, rtol=1e-5, atol=1e-5)
    version = client.get_model_version_by_alias("toy-test", "champion")
    tags = version.tags
    assert tags["crossray.revisions"] == ",".join(revisions) and tags["crossray.layer"] == "2"
    assert tags["crossray.corpus_hash"] == results.extract.corpus_hash
    assert tags["crossray.n_latents"] == "512" and tags["crossray.sparsity"].startswith("relu")
    assert len(tags["crossray.weight_hashes"].split(",")) == 3 and "512 latents" in version.description
    # no tag, param or description holds a path of this machine
    texts = [version.description, *tags.values()]
    for mlflow_run in [parent, *children]:
        texts += [*mlflow_run.data.tags.values(), *mlflow_run.data.params.values()]
    leaks = [t for t in texts for p in _machine_paths(tmp_path) if p in t]
    assert not leaks, leaks


def test_mlflow_ui_in_headless_chromium(tracked_run, mlflow_server, tmp_path):
    """The experiment in the model-training view with the run listed; the parent run's description."""
    import shutil

    from tests.helpers import ARTIFACTS, Chromium

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    results, *_ = tracked_run
    client = MlflowClient(mlflow_server)
    exp_id = client.get_experiment_by_name("crossray-toy").experiment_id
    view = "?workflowType=machine_learning"
    browser = Chromium(exe, tmp_path / "profile")
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=f"{mlflow_server}/#/experiments/{exp_id}{view}")
        browser.wait_for("document.body.innerText.includes('matching runs') && "
                         "document.body.innerText.includes('tiny')", timeout=60)
        text = browser.eval("document.body.innerText")
        assert "Run Name" in text and "Token Usage" not in text  # the runs table, not the GenAI overview
        browser.screenshot(ARTIFACTS / "mlflow_experiment.png")
        browser.call("Page.navigate", url=f"{mlflow_server}/#/experiments/{exp_id}/runs/"
                                          f"{results.mlflow_run_id}{view}")
        browser.wait_for("document.body.innerText.includes('Checkpoints')", timeout=60)
        text = browser.eval("document.body.innerText")
        last = results.select.revisions[-1]
        assert "FVE" in text and last in text and f"fve/{last}" in text  # description and metrics
        browser.screenshot(ARTIFACTS / "mlflow_parent_run.png")
    finally:
        browser.close()
