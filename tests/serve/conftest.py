"""A hand-made pipeline run folder with known numbers, for the query and API tests; the Serve app over
the tiny pipeline's results (one deployment for the session)."""

import json
import math
import time
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import pytest

from tests.helpers import free_port

REVS = ["step1", "step2", "step3"]
# RelIE of the 4 features for task t1 at each checkpoint, and their IE (feature 3 has a NaN IE)
RELIE = {0: [0.1, 0.2, 0.7], 1: [0.6, 0.3, 0.1], 2: [0.2, 0.2, 0.6], 3: [1 / 3, 1 / 3, 1 / 3]}
IE = {0: [0.01, 0.02, 0.07], 1: [-0.6, 0.3, 0.1], 2: [0.02, 0.02, 0.06], 3: [0.0, 0.0, math.nan]}


def write_fake_run(folder: Path) -> Path:
    (folder / "train" / "crosscoder").mkdir(parents=True)
    (folder / "train" / "crosscoder" / "config.json").write_text(json.dumps(
        {"crosscoder": {"revisions": REVS, "n_latents": 4, "family": "fake", "layer": 1}}))
    (folder / "screen" / "tables").mkdir(parents=True)
    acc = [{"revision": f"step{s}", "step": s, "tokens_seen": s * 1000, "task": t,
            "prefix_accuracy": 0.5 + 0.1 * s, "sentence_accuracy": 0.4 + 0.1 * s}
           for t in ("t1", "t2") for s in range(4)]
    pd.DataFrame(acc).to_parquet(folder / "screen" / "tables" / "accuracy.parquet")
    (folder / "evaluate").mkdir()
    (folder / "evaluate" / "metrics.json").write_text(json.dumps(
        {"fve": 0.9, "l0": 5.0, "dead": 1, **{f"fve/{r}": 0.8 + c / 100 for c, r in enumerate(REVS)}}))
    (folder / "attribute" / "effects").mkdir(parents=True)
    effects = [{"task": t, "feature": f, "checkpoint": r, "checkpoint_index": c, "ie": IE[f][c] * (t == "t1"),
                "relie": RELIE[f][c] if t == "t1" else 1 / 3, "relie_class": 0.5,
                "group": "step3 specific" if f in (0, 2) else "others", "all_zero": False,
                "relie_pair/step1-step2": 0.25 * f, "relie_pair/step1-step3": 0.5,
                "relie_pair/step2-step3": 0.75, "relie_pair_all_zero/step1-step2": t == "t1" and f == 2,
                "relie_pair_all_zero/step1-step3": False, "relie_pair_all_zero/step2-step3": False}
               for t in ("t1", "t2") for f in range(4) for c, r in enumerate(REVS)]
    pd.DataFrame(effects).to_parquet(folder / "attribute" / "effects" / "effects.parquet")
    (folder / "attribute" / "effects" / "summary.json").write_text(json.dumps(
        {"tasks": {"t1": {"examples": 10, "selected": [0, 1, 2]}, "t2": {"examples": 12, "selected": []}}}))
    (folder / "analyse" / "tables").mkdir(parents=True)
    features = [{"feature": f, **{f"dec_norm/{r}": 0.1 * (f + 1) * (c + 1) for c, r in enumerate(REVS)},
                 **{f"reldec/{r}": (c + 1) / 6 for c, r in enumerate(REVS)},
                 "reldec_pair/step1-step2": 2 / 3, "reldec_pair/step1-step3": 3 / 4,
                 "reldec_pair/step2-step3": 0.6,
                 "cos/step1-step2": 0.5, "cos/step1-step3": 0.25, "cos/step2-step3": 0.75,
                 "group": "others", "trajectory": "emerging" if f % 2 == 0 else "maintained"}
                for f in range(4)]
    pd.DataFrame(features).to_parquet(folder / "analyse" / "tables" / "features.parquet")
    contexts = [{"feature": 0, "view": v, "rank": 0, "value": 2.0, "seq": 3, "pos": 5, "target": 1,
                 "tokens": ["The", " dogs", " run"], "scores": [0.0, 2.0, 0.5]} for v in ["joint", "step3"]]
    pd.DataFrame(contexts).to_parquet(folder / "analyse" / "tables" / "top_contexts.parquet")
    return folder


@pytest.fixture
def fake_run(tmp_path) -> Path:
    return write_fake_run(tmp_path / "fake")


def wait_ready(url: str, timeout: float = 90) -> None:
    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        try:
            last = httpx.get(f"{url}/health", timeout=2)
            if last.status_code == 200:
                return
        except httpx.HTTPError as e:
            last = e
        time.sleep(0.25)
    raise AssertionError(f"{url}/health never answered 200; last: {getattr(last, 'text', last)}")


@pytest.fixture(scope="package")
def served(tracked_run, mlflow_server, tmp_path_factory):
    """(base URL, pipeline results, pipeline folder) with the app deployed as `crossray`; shut down
    after the last test of tests/serve, so its replicas (1.5 of the session's 2 CPUs) do not idle
    beside the rest of the suite."""
    from ray import serve

    from serve.app import make_app

    results, config, _ = tracked_run
    folder = Path(results.train.crosscoder).parents[1]
    mlflow.set_tracking_uri(mlflow_server)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = make_app({"runs": ["models:/toy-test@champion", str(folder)], "tracking_uri": mlflow_server,
                    "cache_dir": str(tmp_path_factory.mktemp("serve-cache")),
                    "limits": {"deadline_s": 8}},  # answers before a client's 10 s timeout
                   num_replicas=2)
    serve.run(app, name="crossray", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    yield url, results, folder
    serve.shutdown()


@pytest.fixture
def page(served, tmp_path):
    """Headless Chromium on the served app's page (skipped where Debian's chromium is missing)."""
    from tests.helpers import chromium_page

    with chromium_page(f"{served[0]}/", tmp_path / "profile") as browser:
        yield browser
