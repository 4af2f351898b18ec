"""Shared fixtures: offline hubs, seeds, the cached toy family, tiny random HF checkpoints."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train's watcher of spot-node preemption: an actor per fit, polling the cluster every 5 s; the
# suite preempts no node (about 1 CPU-second a fit, inherited by the runs that join the session's Ray)
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

import contextlib  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_BLIMP = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "blimp"


from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()


SUITE_BUDGET_S = 720
"""`make test` on the 2-core machine: at most 12 minutes of pytest, no test over 90 s (setup included)."""
TEST_BUDGET_S = 90


def pytest_sessionstart(session):
    import time

    session.config._crossray_started = time.time()
    _tracking_server(session.config)  # comes up while the tests are collected


def pytest_terminal_summary(terminalreporter, config):
    """The guard against a slow default suite: the total against its budget, and every test whose
    setup and call together took over its budget, named (a printout, not a failure: no test asserts a
    time)."""
    import time

    started = getattr(config, "_crossray_started", None)
    if started is None:
        return
    per_test: dict[str, float] = {}
    for reports in terminalreporter.stats.values():
        for r in reports:
            if getattr(r, "when", None) in ("setup", "call"):
                per_test[r.nodeid] = per_test.get(r.nodeid, 0.0) + r.duration
    total = time.time() - started
    over = sorted(((t, n) for n, t in per_test.items() if t > TEST_BUDGET_S), reverse=True)
    verdict = "within" if total <= SUITE_BUDGET_S else "OVER"
    terminalreporter.write_sep("-", f"suite: {total:.0f} s of pytest, {verdict} its budget of "
                                    f"{SUITE_BUDGET_S} s; {len(over)} test(s) over {TEST_BUDGET_S} s")
    for t, name in over:
        terminalreporter.write_line(f"  {t:.0f} s (setup + call): {name}")


def pytest_collection_modifyitems(items):
    """The multi-node rehearsal runs first: it starts three Ray nodes of its own, and a raylet that
    cannot register within Ray's fixed 30 s (a machine busy with the rest of the suite) fails
    `ray start`. The stage graph's tests come next: the first of them reads the session's light run
    as it was made, so the run's setup counts against that test, not against a fault test that only
    compares with it (tests/jobs/test_faults.py)."""
    def rank(item) -> int:
        if item.get_closest_marker("rehearsal"):
            return 0
        return 1 if item.module.__name__.endswith("test_stage_graph") else 2

    items.sort(key=rank)


@pytest.fixture(scope="session", autouse=True)
def _no_process_outlives_the_suite(request):
    """Fails the suite when a process it started is still alive at its end (set up first, so torn
    down last: after the session's Ray cluster, tracking server and Serve have stopped). Stragglers
    get 30 s to exit, then are killed and named."""
    import time

    import psutil

    from tests.helpers import stray_processes

    before = set() if os.environ.get("CROSSRAY_OWN_PIDNS") == "1" else {p.pid for p in psutil.process_iter()}
    yield
    _tracking_server(request.config).stop()  # (when no test asked for it)
    deadline = time.time() + 30
    while (strays := stray_processes(before)) and time.time() < deadline:
        time.sleep(1)
    if strays:
        names = []
        for p in strays:
            with contextlib.suppress(psutil.NoSuchProcess):
                names.append(f"pid {p.pid} {' '.join(p.cmdline())[:120]!r}")
                p.kill()
        pytest.fail(f"{len(names)} process(es) started by the tests outlived the suite: {names}")


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def toy_dir() -> Path:
    """The default toy family, built once into the cache (CROSSRAY_CACHE) and reused."""
    from crossray.toy.build import ToyConfig, build_toy_family

    return build_toy_family(None, ToyConfig())


@pytest.fixture(scope="session")
def toy_family(toy_dir):
    from crossray.checkpoints import Family

    return Family.from_dir(toy_dir)


@pytest.fixture(scope="session")
def toy_tokenizer(toy_family):
    from crossray.models.layer import load_tokenizer

    return load_tokenizer(toy_family, toy_family.available_revisions()[0])


def tiny_config(arch: str, n_layers: int = 3, d: int = 32, vocab: int = 128):
    """A randomly initialised config of a given architecture, small enough for milliseconds."""
    import transformers as tf

    common = dict(vocab_size=vocab)
    match arch:
        case "gpt_neox":
            return tf.GPTNeoXConfig(hidden_size=d, num_hidden_layers=n_layers, num_attention_heads=4,
                                    intermediate_size=4 * d, rotary_pct=0.25, **common)
        case "gpt2":
            return tf.GPT2Config(n_embd=d, n_layer=n_layers, n_head=4, n_positions=64, **common)
        case "llama":
            return tf.LlamaConfig(hidden_size=d, num_hidden_layers=n_layers, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=2 * d, **common)
        case "bloom":
            return tf.BloomConfig(hidden_size=d, n_layer=n_layers, n_head=4, **common)
        case other:
            raise ValueError(other)


def save_tiny_family(root: Path, arch: str, revisions=("step1", "step2"), seed: int = 0) -> Path:
    """A local family folder of randomly initialised checkpoints, one per revision."""
    from transformers import AutoModelForCausalLM

    for i, rev in enumerate(revisions):
        torch.manual_seed(seed + i)
        model = AutoModelForCausalLM.from_config(tiny_config(arch))
        model.save_pretrained(root / rev)
    return root


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (2 CPUs; actors and workers take 0.5 CPU)."""
    import ray

    from rayenv import runtime_env

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env=runtime_env({"PYTHONPATH": str(Path(__file__).resolve().parents[1])}))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_address(ray_cluster) -> str:
    """The session cluster's address, for a `crossray run` in a process of its own to join (as a
    driver on a cluster does) instead of starting a Ray of its own: about 30 CPU-seconds and several
    seconds of wall time less for each (GCS, raylet, agents, log monitor, Ray Data's actors)."""
    return ray_cluster.get_runtime_context().gcs_address


@pytest.fixture(scope="session")
def toy_extract_cfg(toy_dir):
    """A small extraction of the toy family: 3 checkpoints (chance, middle, learned), layer 2."""
    from crossray.corpus import CorpusConfig
    from crossray.extract import ExtractConfig

    return ExtractConfig(family=str(toy_dir), revisions=("step0", "step128", "step1000"), layer=2,
                         corpus=CorpusConfig(source=str(toy_dir / "corpus" / "train.jsonl"), seq_len=64,
                                             n_sequences=192),
                         shard_sequences=16, batch_sequences=16, norm_sequences=64)


@pytest.fixture(scope="session")
def toy_acts(ray_cluster, toy_extract_cfg, tmp_path_factory):
    """Parquet shards + manifest of the toy extraction (shared by the job tests)."""
    from jobs.extract import run_extract

    out = tmp_path_factory.mktemp("acts") / "toy"
    run_extract(toy_extract_cfg, out)
    return out


def _tracking_server(config):
    """The session's tracking server (`tests.helpers.TrackingServer`), started as pytest starts (so it
    comes up while the tests are collected) by the first call (`pytest_sessionstart`'s), and stopped by
    `mlflow_server`'s teardown, or, when no test asked for it, before the stray-process check."""
    from tests.helpers import TrackingServer

    if getattr(config, "_crossray_mlflow", None) is None:
        config._crossray_mlflow = TrackingServer(config._tmp_path_factory.mktemp("mlflow"))
    return config._crossray_mlflow


@pytest.fixture(scope="session")
def mlflow_root(request) -> Path:
    """The tracking server's folder: its sqlite store, and its artifact store under artifacts/."""
    return _tracking_server(request.config).root


@pytest.fixture(scope="session")
def mlflow_server(request):
    """The session's real tracking server: its URI once it answers."""
    server = _tracking_server(request.config)
    if not server.wait_ready():
        server.stop()
        pytest.fail("mlflow server did not start")
    yield server.uri
    server.stop()


@pytest.fixture(scope="session")
def tracked_run(ray_cluster, mlflow_server, tmp_path_factory):
    """configs/tiny.yaml as `make demo` runs it (its output folder and registered name aside), tracked
    in the real MLflow server, run once per session: (RunOutcome, config path, the summary that
    `crossray run --json` prints). Read by the pipeline, report, science and Serve tests."""
    import mlflow

    from crossray.config import load_config
    from crossray.pipeline.summary import summary_json
    from crossray.tracking import check_tracking
    from jobs.pipeline import run
    from tests.helpers import tiny_pipeline_config

    tmp_path = tmp_path_factory.mktemp("pipeline")
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
    mlflow.set_tracking_uri(mlflow_server)
    try:
        check_tracking()
        config = tiny_pipeline_config(tmp_path)
        outcome = run(load_config(config), config.name)
        yield outcome, config, summary_json(outcome)
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]


@pytest.fixture(scope="session")
def light_chain(ray_cluster, toy_dir, tmp_path_factory):
    """The smallest whole pipeline (`light_pipeline_config`) in one folder with a sqlite MLflow store of
    its own, run once per session: a namespace with `first` (its RunOutcome and JSON summary: the
    Parquet reference the stream-mode and resume tests compare with), `run_it(**changes)` (change
    fields, written `section__key`, and run the same folder again: tests/jobs/test_stage_graph.py),
    `config`, `root` and `uri`."""
    import types

    import mlflow
    import yaml

    from crossray.config import load_config
    from crossray.pipeline.summary import summary_json
    from jobs.pipeline import run
    from tests.helpers import light_pipeline_config, set_fields

    root = tmp_path_factory.mktemp("light")
    path = light_pipeline_config(root, toy_dir, changes={"launch.register_name": "toy-graph"})
    cfg = yaml.safe_load(path.read_text())
    uri = f"sqlite:///{root}/mlflow.db"

    def run_it(**changes):
        set_fields(cfg, {k.replace("__", "."): v for k, v in changes.items()})
        path.write_text(yaml.safe_dump(cfg))
        previous = mlflow.get_tracking_uri()
        try:
            outcome = run(load_config(path), path.name, uri)
        finally:
            mlflow.set_tracking_uri(previous)  # the pipeline sets MLflow's global URI: not for other tests
        return summary_json(outcome), outcome

    summary, outcome = run_it()
    return types.SimpleNamespace(first=(summary, outcome), run_it=run_it, config=path, root=root, uri=uri)
