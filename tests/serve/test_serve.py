"""The Serve application on the session's local Ray, over real HTTP, with the tiny pipeline's results
loaded from the MLflow server (by registered model) and from the pipeline folder.

Every endpoint is checked against the stored tables; bad input gets 4xx; schemathesis fuzzes the
OpenAPI schema; headless Chromium opens the page, clicks a feature and keeps a screenshot; a replica
killed under load is replaced with fewer than 1% failed requests.
"""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

from tests.helpers import ARTIFACTS, free_port, replica_pids
from tests.serve.conftest import wait_ready

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]


def test_every_endpoint_matches_the_stored_tables(served):
    url, results, folder = served
    c = httpx.Client(base_url=url, timeout=10)
    parent = results.mlflow_run_id
    health = c.get("/health").json()  # the model deployment says where live queries compute: no GPU here
    assert health == {"status": "ok", "runs": sorted([parent, "tiny"]),
                      "live": {"device": "cpu", "gpus": 0.0}}
    runs = {r["id"]: r for r in c.get("/runs").json()}
    revisions = results.select.revisions
    for run in runs.values():
        assert [ck["revision"] for ck in run["checkpoints"]] == revisions
        metrics = results.evaluate.metrics
        assert [ck["fve"] for ck in run["checkpoints"]] == [metrics[f"fve/{r}"] for r in revisions]
        assert run["family"] == "toy" and run["layer"] == 2 and run["n_latents"] == 512
    assert runs[parent]["registered_model"] == "models:/toy-test@champion" and runs[parent]["name"] == "tiny"
    assert [ck["tokens_seen"] for ck in runs[parent]["checkpoints"]] == [
        int(r.removeprefix("step")) * 2048 for r in revisions]  # toy: 2048 tokens per step

    effects = pd.read_parquet(folder / "attribute" / "effects" / "effects.parquet")
    features = pd.read_parquet(folder / "analyse" / "tables" / "features.parquet").set_index("feature")
    task = "simple_agreement"
    for run_id in (parent, "tiny"):  # the MLflow copy and the folder answer the same numbers
        for ck, rev in enumerate(revisions):
            got = {}
            for offset in (0, 500):
                page = c.get(f"/runs/{run_id}/tasks/{task}/ranking",
                             params={"checkpoint": rev if ck else 0, "limit": 500, "offset": offset}).json()
                got.update({i["feature"]: i["relie"] for i in page["items"]})
                assert page["total"] == 512
            want = effects[(effects.task == task) & (effects.checkpoint == rev)].set_index("feature").relie
            assert got == want.to_dict()  # the same RelIE numbers the table holds
            assert list(got.values()) == sorted(got.values(), reverse=True)
    top = c.get(f"/runs/{parent}/tasks/{task}/ranking",
                params={"checkpoint": revisions[-1], "by": "abs_ie", "limit": 1}).json()["items"][0]
    card = c.get(f"/runs/{parent}/features/{top['feature']}").json()
    row = features.loc[top["feature"]]
    assert card["decoder_norm"] == [row[f"dec_norm/{r}"] for r in revisions]
    assert card["relative_norm"] == [row[f"reldec/{r}"] for r in revisions]
    assert card["trajectory"] == row["trajectory"] and card["group"] == row["group"]
    assert len(card["cosine"]) == 3  # every pair of 3 checkpoints
    sub = effects[(effects.task == task) & (effects.feature == top["feature"])]
    sub = sub.sort_values("checkpoint_index")
    pairs = [c for c in sub.columns if c.startswith("relie_pair/")]
    flag = lambda c: bool(sub[c.replace("_pair/", "_pair_all_zero/")].iloc[0])  # noqa: E731
    assert card["effects"][task] == {"ie": sub.ie.tolist(), "relie": sub.relie.tolist(),
                                     "group": sub.group.iloc[0],
                                     "relie_pairs": [{"pair": c.split("/", 1)[1], "share": sub[c].iloc[0],
                                                      "all_zero": flag(c)} for c in pairs]}
    assert len(pairs) == 3 and [p["pair"] for p in card["relative_norm_pairs"]] == \
        [c.removeprefix("reldec_pair/") for c in row.index if c.startswith("reldec_pair/")]
    assert set(card["effects"]) == set(effects.task)
    assert set(card["contexts"]) == {"joint", *revisions}
    ctx = card["contexts"]["joint"][0]
    assert ctx["scores"][ctx["target"]] == pytest.approx(ctx["value"], rel=1e-3) and len(ctx["tokens"]) > 3
    batch = c.post(f"/runs/{parent}/features", json={"ids": [top["feature"], 0, 511]}).json()
    assert [f["feature"] for f in batch["features"]] == [top["feature"], 0, 511]
    assert batch["features"][0]["effects"] == card["effects"]
    acc = c.get(f"/runs/{parent}/accuracy").json()
    table = pd.read_parquet(folder / "screen" / "tables" / "accuracy.parquet")
    points = acc["tasks"][task]
    assert [p["prefix_accuracy"] for p in points] == table[table.task == task].prefix_accuracy.tolist()
    assert [p["revision"] for p in points if p["crosscoded"]] == revisions


def test_bad_input_over_http_is_4xx(served):
    url, results, _ = served
    c = httpx.Client(base_url=url, timeout=10)
    parent = results.mlflow_run_id
    for method, path, body, status in [
        ("GET", "/runs/unknown-run", None, 404), ("GET", f"/runs/{parent}/features/512", None, 404),
        ("GET", f"/runs/{parent}/features/-3", None, 422), ("GET", f"/runs/{parent}/features/x", None, 422),
        ("GET", f"/runs/{parent}/tasks/nope/ranking?checkpoint=0", None, 404),
        ("GET", f"/runs/{parent}/tasks/simple_agreement/ranking?checkpoint=step999", None, 404),
        ("GET", f"/runs/{parent}/tasks/simple_agreement/ranking?checkpoint=0&limit=1000000", None, 422),
        ("POST", f"/runs/{parent}/features", b"{]", 422), ("POST", f"/runs/{parent}/features", b"[1]", 422),
    ]:
        r = c.request(method, path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, (path, r.text)
        assert r.json()["detail"]


def test_schema_fuzz_finds_no_server_error(served, tmp_path):
    """schemathesis against the live OpenAPI schema, twice: every parameter fuzzed, then with the real
    run and task fixed so the fuzzing reaches the data. Bounded to 40 cases per operation. Bodies also
    draw empty, blank and very long strings, and pairs in the shape the model reads
    (`schemathesis_hooks.py`): no 5xx."""
    import re

    url, results, _ = served
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert exe, "schemathesis is part of the test extra"
    fixed = tmp_path / "fixed.toml"
    fixed.write_text(f'[parameters]\n"path.run" = "{results.mlflow_run_id}"\n'
                     '"path.task" = "simple_agreement"\n')
    total = 0
    for config in ([], ["--config-file", str(fixed)]):
        cmd = [exe, *config, "run", f"{url}/openapi.json", "--checks", "not_a_server_error,"
               "status_code_conformance,content_type_conformance,response_schema_conformance",
               "--max-examples", "40", "--seed", "1", "--phases", "examples,fuzzing", "--workers", "1",
               "--generation-database", "none", "--request-timeout", "10", "--no-color"]
        hooks = {"SCHEMATHESIS_HOOKS": "tests.serve.schemathesis_hooks", "PYTHONPATH": str(ROOT),
                 "CROSSRAY_FUZZ_MARK": str(tmp_path / "hooks-used")}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                              env={**os.environ, **hooks})
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
        generated = re.search(r"(\d+) generated, (\d+) passed", proc.stdout)
        assert generated and generated[1] == generated[2], proc.stdout[-3000:]
        total += int(generated[1])
    assert total >= 400  # a few hundred cases over the 7 operations
    assert (tmp_path / "hooks-used").exists()  # the bodies drew hostile strings
    print(f"schemathesis: {total} cases, no server error, no schema violation")


def test_page_in_headless_chromium(served, page):
    url, results, _ = served
    browser = page  # on the app's page already
    rows = browser.wait_for("document.querySelectorAll('tr.feature-row').length")
    task, checkpoint = (browser.eval(f"document.getElementById('{k}').value")
                        for k in ("task", "checkpoint"))
    assert checkpoint == results.select.revisions[-1]
    want = httpx.get(f"{url}/runs/{results.mlflow_run_id}/tasks/{task}/ranking",
                     params={"checkpoint": checkpoint, "selected": True, "limit": 25}).json()
    assert rows == len(want["items"]) > 0  # the first page of the ranking, in the API's order
    shown = browser.eval("[...document.querySelectorAll('tr.feature-row')].map(r => +r.dataset.feature)")
    assert shown == [i["feature"] for i in want["items"]]
    screened = httpx.get(f"{url}/runs/{results.mlflow_run_id}/accuracy", params={"task": task}).json()
    circles = browser.eval("document.querySelectorAll('#accuracy-chart circle').length")
    assert circles == len(screened["tasks"][task]) == 12  # one a screened revision of tiny.yaml
    feature = int(browser.eval("document.querySelector('tr.feature-row').dataset.feature"))
    browser.click("document.querySelector('tr.feature-row')")
    title = browser.wait_for("(() => { const t = document.getElementById('card-title').textContent;"
                             " return t.startsWith('Feature ') && t; })()")
    assert title == f"Feature {feature}"
    assert browser.wait_for("document.querySelectorAll('#card-body .context').length") > 0
    assert browser.screenshot(ARTIFACTS / "serve_page.png").stat().st_size > 10_000



def test_killed_replica_is_replaced_under_load(served):
    """SIGKILL one of two replicas during steady load: Serve replaces it, < 1% of requests fail."""
    url, results, _ = served
    pids = replica_pids()
    assert len(pids) == 2, pids
    paths = [f"/runs/{results.mlflow_run_id}/features/{i}?contexts=false" for i in range(0, 512, 37)]
    stop, counts, lock = threading.Event(), {"ok": 0, "failed": 0}, threading.Lock()
    failures = []

    def load():
        with httpx.Client(base_url=url, timeout=10) as c:
            i = 0
            while not stop.is_set():
                try:
                    r = c.get(paths[i % len(paths)])
                    ok = r.status_code == 200
                    if not ok:
                        failures.append(f"{r.status_code} {r.text[:100]}")
                except httpx.HTTPError as e:
                    ok = False
                    failures.append(repr(e))
                with lock:
                    counts["ok" if ok else "failed"] += 1
                i += 1
                time.sleep(0.02)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(3)
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.time() + 60
        while time.time() < deadline and (len(replica_pids()) < 2 or pids[0] in replica_pids()):
            time.sleep(0.5)
        time.sleep(3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    new = replica_pids()
    assert len(new) == 2 and pids[0] not in new, "Serve did not replace the killed replica"
    total = counts["ok"] + counts["failed"]
    print(f"replica kill under load: {counts['failed']} of {total} requests failed: {failures}")
    assert total > 200 and counts["failed"] / total < 0.01
    wait_ready(url, timeout=30)


@pytest.mark.slow  # the same app as the in-process Serve tests, through its command line
def test_crossray_serve_command(tmp_path):
    """`crossray serve` starts its own local Ray and Serve, answers, and stops cleanly on SIGTERM."""
    from tests.serve.conftest import write_fake_run

    run = write_fake_run(tmp_path / "fake")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    exe = Path(sys.executable).parent / "crossray"
    proc = subprocess.Popen([str(exe), "serve", "--run", str(run), "--port", str(port), "--cache-dir",
                             str(tmp_path / "cache")], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        import select

        ready, _, _ = select.select([proc.stdout], [], [], 120)  # bounded: never hang the suite
        line = proc.stdout.readline() if ready else "(nothing within 120 s)"
        assert line.startswith(f"crossray serving 1 run(s) at http://127.0.0.1:{port}/"), line
        assert httpx.get(f"http://127.0.0.1:{port}/runs/fake", timeout=10).json()["n_latents"] == 4
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0


def test_replicas_sharing_a_cache_download_a_run_once(served, tmp_path, monkeypatch):
    """Two replicas (here threads) loading one run into one cache at once: one downloads each file,
    the other waits for it and reuses the files; no lock or temporary folder is left."""
    from concurrent.futures import ThreadPoolExecutor

    import mlflow

    from crossray.results import mlflow_folder

    _, results, _ = served
    real, calls = mlflow.artifacts.download_artifacts, []

    def slow(**kw):
        calls.append(kw["artifact_path"])
        time.sleep(0.2)  # the second replica arrives while the first is downloading
        return real(**kw)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", slow)
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda _: mlflow_folder(results.mlflow_run_id, cache, weights=True)[0], range(2)))
    assert got[0] == got[1] and (got[0] / "train" / "crosscoder" / "weights.safetensors").is_file()
    assert len(calls) == len(set(calls))  # every file downloaded once
    assert sorted(p.name for p in cache.iterdir()) == [got[0].name]
