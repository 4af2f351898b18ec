"""The HTTP layer without Ray: error mapping, readiness, the bearer token, the schema and the page."""

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from serve.api import ServiceState, build_api

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def state(fake_run, tmp_path):
    s = ServiceState([str(fake_run)], tmp_path / "cache")
    s.load()
    return s


@pytest.fixture
def client(state):
    return TestClient(build_api(state), raise_server_exceptions=False)


def test_not_ready_until_loaded(fake_run, tmp_path):
    state = ServiceState([str(fake_run)], tmp_path / "cache")
    client = TestClient(build_api(state))
    assert client.get("/health").status_code == 503
    assert client.get("/runs/fake").json() == {"detail": "runs are still loading"}
    state.load()
    assert client.get("/health").json() == {"status": "ok", "runs": ["fake"], "live": None}


def test_health_says_where_live_queries_compute(state):
    """The model deployment's device and GPUs (a GPU replica here); while it does not answer, nulls
    and still 200: the tables are served."""

    class Live:
        def __init__(self, where):
            self.where = where

        async def __call__(self, kind, run_id, body):
            return {}

        async def info(self):
            if self.where is None:
                raise RuntimeError("the model replica is still loading")
            return self.where

    on_gpu = TestClient(build_api(state, live=Live({"device": "cuda", "gpus": 1.0}))).get("/health")
    assert on_gpu.json()["live"] == {"device": "cuda", "gpus": 1.0}
    starting = TestClient(build_api(state, live=Live(None))).get("/health")
    assert starting.status_code == 200 and starting.json()["live"] == {"device": None, "gpus": None}


def test_failed_load_stays_unavailable(tmp_path):
    state = ServiceState([str(tmp_path / "nothing-here")], tmp_path / "cache")
    state.load()
    r = TestClient(build_api(state)).get("/health")
    assert r.status_code == 503 and "loading" in r.json()["detail"] and "nothing-here" in r.json()["detail"]


@pytest.mark.parametrize("method,path,body,status,detail", [
    ("get", "/runs/nope", None, 404, "unknown run 'nope'"),
    ("get", "/runs/fake/features/4", None, 404, "feature 4 out of range"),
    ("get", "/runs/fake/features/-1", None, 422, "greater than or equal to 0"),
    ("get", "/runs/fake/features/abc", None, 422, "valid integer"),
    ("get", "/runs/fake/features/99999999999999999999", None, 422, "less than or equal"),
    ("get", "/runs/fake/tasks/nope/ranking?checkpoint=0", None, 404, "unknown task 'nope'"),
    ("get", "/runs/fake/tasks/t1/ranking?checkpoint=step9", None, 404, "unknown checkpoint 'step9'"),
    ("get", "/runs/fake/tasks/t1/ranking", None, 422, "checkpoint"),
    ("get", "/runs/fake/tasks/t1/ranking?checkpoint=0&limit=100000", None, 422, "less than or equal to 500"),
    ("get", "/runs/fake/tasks/t1/ranking?checkpoint=0&offset=-5", None, 422, "greater than or equal"),
    ("get", "/runs/fake/tasks/t1/ranking?checkpoint=0&by=size", None, 422, "'relie' or 'abs_ie'"),
    ("get", "/runs/fake/tasks/t1/ranking?checkpoint=0&trajectory=growing", None, 422, "'emerging'"),
    ("get", "/runs/fake/accuracy?task=zzz", None, 404, "unknown task 'zzz'"),
    ("post", "/runs/fake/features", b"{not json", 422, "JSON"),
    ("post", "/runs/fake/features", b'{"ids": []}', 422, "at least 1"),
    ("post", "/runs/fake/features", b'{"ids": [0, 7]}', 404, "feature 7 out of range"),
    ("post", "/runs/fake/features", b'{"ids": "0"}', 422, "valid list"),
    ("get", "/nothing", None, 404, "Not Found"),
])
def test_bad_input_is_a_clear_4xx(client, method, path, body, status, detail):
    r = client.request(method, path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert detail in str(r.json()["detail"])


def test_routes_answer_from_the_tables(client):
    assert client.get("/runs").json()[0]["id"] == "fake"
    card = client.get("/runs/fake/features/1").json()
    assert card["effects"]["t1"]["ie"] == pytest.approx([-0.6, 0.3, 0.1])
    batch = client.post("/runs/fake/features", json={"ids": [2, 0]}).json()
    assert [c["feature"] for c in batch["features"]] == [2, 0] and batch["features"][1]["contexts"] == {}
    assert client.post("/runs/fake/features", json={"ids": [0], "contexts": True}).json()[
        "features"][0]["contexts"]["joint"][0]["target"] == 1
    r = client.get("/runs/fake/tasks/t1/ranking", params={"checkpoint": "step3", "min_relie": 0.5}).json()
    assert [i["feature"] for i in r["items"]] == [0, 2]
    nan = client.get("/runs/fake/tasks/t1/ranking", params={"checkpoint": "step3", "min_relie": "nan"})
    assert nan.status_code == 422 and nan.json()["detail"][0]["loc"] == ["query", "min_relie"]  # (was 200)


def test_bearer_token(state):
    client = TestClient(build_api(state, token="s3cret"))
    r = client.get("/runs")
    assert r.status_code == 401 and r.json() == {"detail": "a bearer token is required"}
    assert r.headers["www-authenticate"] == "Bearer"
    assert client.get("/runs", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/health").status_code == 200 and client.get("/").status_code == 200


def test_schema_and_page(client):
    schema = client.get("/openapi.json").json()
    assert {"/health", "/runs", "/runs/{run}", "/runs/{run}/features/{feature}", "/runs/{run}/features",
            "/runs/{run}/tasks/{task}/ranking", "/runs/{run}/accuracy"} <= set(schema["paths"])
    assert "404" in schema["paths"]["/runs/{run}/features/{feature}"]["get"]["responses"]
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.headers["content-type"].startswith("text/html") and "/ranking" in page.text


def test_serve_config_and_builder(fake_run, monkeypatch):
    """serve/config.yaml is a valid Serve config whose import path builds the app; bad args are named."""
    import importlib

    import yaml
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from serve.app import build_app

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve" / "config.yaml").read_text()))
    assert config.http_options.host == "127.0.0.1"
    app_cfg = config.applications[0]
    assert app_cfg.deployments[0].autoscaling_config["max_replicas"] >= 2
    module, _, attr = app_cfg.import_path.partition(":")
    builder = getattr(importlib.import_module(module), attr)
    app = call_user_app_builder_with_args_if_necessary(builder, {**app_cfg.args, "runs": [str(fake_run)]})
    assert type(app).__name__ == "Application"
    # the config's deployment settings name the app's two deployments (a typo there is ignored by Serve)
    assert {d.name for d in app_cfg.deployments} == {"CrosscoderService", "LiveModel"}
    live = next(d for d in app_cfg.deployments if d.name == "LiveModel")
    assert live.autoscaling_config["max_replicas"] >= 2
    with pytest.raises(ValueError, match="'limits': .*pair"):
        build_app({"runs": [str(fake_run)], "limits": {"pair": 3}})
    with pytest.raises(ValueError, match=r"unknown serve argument\(s\) \['run'\]"):
        build_app({"run": ["x"]})
    with pytest.raises(ValueError, match="'runs' must be a non-empty list"):
        build_app({"runs": "x"})
    with pytest.raises(ValueError, match=r"batch_size \(got 0\) must be >= 1"):
        build_app({"runs": [str(fake_run)], "batch_size": 0})
    with pytest.raises(ValueError, match="'allowed_hosts' must be a list of host names"):
        build_app({"runs": [str(fake_run)], "allowed_hosts": "localhost"})
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    with pytest.raises(ValueError, match="token_env 'NO_SUCH_TOKEN'"):
        build_app({"runs": [str(fake_run)], "token_env": "NO_SUCH_TOKEN"})


def test_cli_refuses_a_bad_run_before_starting_ray(tmp_path, capsys):
    from jobs.cli import main

    code = main(["serve", "--run", str(tmp_path / "missing"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                 "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is neither a pipeline folder, an MLflow run id" in err[0]
    code = main(["serve", "--run", "0" * 32, "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                 "--cache-dir", str(tmp_path / "cache")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("crossray: error")]
    assert code == 2 and err[0].startswith(f"crossray: error: MLflow has no run or model '{'0' * 32}'")
    config = tmp_path / "c.yaml"  # a run config names its pipeline folder
    config.write_text((ROOT / "configs" / "tiny.yaml").read_text().replace("out: runs", f"out: {tmp_path}/r"))
    code = main(["serve", "--config", str(config), "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                 "--cache-dir", str(tmp_path / "cache")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("crossray: error")]
    assert code == 2 and f"'{tmp_path}/r/tiny' is neither a pipeline folder" in err[0], err


def test_bodies_are_bounded(state):
    """A body over the limit is a 413 (by its length, or while it streams in); unknown fields are a
    422; a 422 echoes only a short prefix of what was sent."""
    import json

    client = TestClient(build_api(state), raise_server_exceptions=False)
    big = json.dumps({"ids": [0], "padding": "x" * 2_000_000})
    r = client.post("/runs/fake/features", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit of 1000000 bytes" in r.json()["detail"]
    chunks = (b"x" * 65536 for _ in range(40))  # no Content-Length: chunked
    r = client.post("/runs/fake/features", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = client.post("/runs/fake/features", json={"ids": [0], "context": True})  # a misspelt field
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "context"]
    assert client.post("/runs/fake/features", json={"ids": [0, 1]}).status_code == 200
    roomy = TestClient(build_api(state, max_body_bytes=50_000_000), raise_server_exceptions=False)
    r = roomy.post("/runs/fake/features", json={"ids": list(range(1_500_000))})
    assert r.status_code == 422 and len(r.content) < 2000, len(r.content)
    assert "1500000 items" in r.text


def test_every_body_that_is_not_json_text_gets_a_4xx(state, caplog):
    """A form body (curl -d's default), plain text, or no content type: 415 naming what was sent; a
    lone surrogate (JSON may escape one, Unicode text may not): 422 with no internal message."""
    client = TestClient(build_api(state), raise_server_exceptions=False)
    sent = [("application/x-www-form-urlencoded", b"ids=1"), ("text/plain", b'{"ids": [1]}'),
            (None, b'{"ids":[1]}')]
    for kind, body in sent:
        r = client.post("/runs/fake/features", content=body, headers={"content-type": kind} if kind else {})
        assert r.status_code == 415, (kind, r.text)
        assert r.json()["detail"].startswith("the request body must be JSON (content-type application/json)")
        assert (kind or "without a content type") in r.json()["detail"]
    assert client.post("/runs/fake/features", content=b'{"ids": [1]}',
                       headers={"content-type": "application/json; charset=utf-8"}).status_code == 200
    json_type = {"content-type": "application/json"}
    surrogates = (("activations", '{"text": "a\\ud800b"}'), ("features", '{"ids": [1], "x": "\\udc00"}'))
    for path, body in surrogates:
        r = client.post(f"/runs/fake/{path}", content=body.encode(), headers=json_type)
        assert r.status_code == 422 and "codec" not in r.text, r.text  # no internal message


PAIR = {"clean_prefix": "The dog", "clean_answer": " runs", "patch_answer": " run"}


def test_live_routes_without_a_model_deployment_are_503(client):
    r = client.post("/runs/fake/effects", json={"pairs": [PAIR]})
    assert r.status_code == 503 and "live queries are off" in r.json()["detail"]


def test_live_deadline_is_503_with_retry_after_and_the_service_keeps_serving(state):
    """Model work past the deadline answers 503 with Retry-After; the next request is answered."""
    import asyncio

    from serve.schemas import LiveLimits

    calls = []

    async def slow_then_fast(kind: str, run_id: str, body: dict) -> dict:
        calls.append((kind, run_id))
        if len(calls) == 1:
            await asyncio.sleep(5)
        return {"error": "invalid", "detail": "no pair is usable"} if kind == "effects" else \
            {"checkpoints": ["step1"], "tokens": []}

    client = TestClient(build_api(state, live=slow_then_fast, limits=LiveLimits(deadline_s=0.2)))
    r = client.post("/runs/fake/activations", json={"text": "The dog"})
    assert r.status_code == 503 and r.headers["retry-after"] == "5" and "0.2 s deadline" in r.json()["detail"]
    assert client.post("/runs/fake/activations", json={"text": "The dog"}).json() == {
        "run": "fake", "checkpoints": ["step1"], "tokens": []}
    r = client.post("/runs/fake/effects", json={"pairs": [PAIR]})  # a model-side refusal is a 422
    assert r.status_code == 422 and r.json()["detail"][0]["msg"] == "no pair is usable"
    assert calls == [("activations", "fake")] * 2 + [("effects", "fake")]
    r = client.post("/runs/fake/effects", json={"pairs": [PAIR], "features": [4]})  # checked before the model
    assert r.status_code == 404 and len(calls) == 3


def test_live_model_failure_is_503_not_500(state):
    async def broken(kind: str, run_id: str, body: dict) -> dict:
        raise RuntimeError("replica died")

    r = TestClient(build_api(state, live=broken)).post("/runs/fake/effects", json={"pairs": [PAIR]})
    assert r.status_code == 503 and "RuntimeError" in r.json()["detail"]


def test_pairs_are_checked_before_the_model_sees_them(state):
    """Empty text and text over the per-field limit are 422s naming the row and the field, answered by
    the table layer: the model deployment is never called for them."""
    from serve.schemas import LiveLimits

    calls = []

    async def live(kind: str, run_id: str, body: dict) -> dict:
        calls.append(body)
        return {"checkpoints": ["step1"], "features": []}

    client = TestClient(build_api(state, live=live, limits=LiveLimits(pair_chars=100)))
    empty = {"clean_prefix": "", "clean_answer": " waits", "patch_answer": " wait"}
    for path, body, loc, says in [
        ("effects", {"pairs": [PAIR, empty]}, ["body", "pairs", 1, "clean_prefix"], "is empty"),
        ("ablate", {"pairs": [empty], "features": [1]}, ["body", "pairs", 0, "clean_prefix"], "is empty"),
        ("effects", {"pairs": [{**PAIR, "clean_answer": " "}]}, ["body", "pairs", 0, "clean_answer"],
         "is empty"),
        ("effects", {"pairs": [{**PAIR, "clean_prefix": "x" * 40_000}], "steps": 64},
         ["body", "pairs", 0, "clean_prefix"], "40000 characters; at most 100 per field"),
        ("effects", {"pairs": [{"sentence_good": "", "sentence_bad": "b"}]},
         ["body", "pairs", 0, "sentence_good"], "is empty"),
    ]:
        r = client.post(f"/runs/fake/{path}", json=body)
        assert r.status_code == 422, r.text
        [error] = r.json()["detail"]
        assert error["loc"] == loc and says in error["msg"], error
    assert calls == []
    assert client.post("/runs/fake/effects", json={"pairs": [PAIR]}).status_code == 200
    [sent] = calls  # what the model is told of its bounds
    assert sent["limits"]["chars"] == 100 and sent["limits"]["tokens"] == LiveLimits().tokens
    assert sent["limits"]["deadline"] > 0


def test_live_limits_are_positive():
    from serve.schemas import LiveLimits

    for bad in ({"tokens": -1}, {"deadline_s": float("nan")}, {"pairs": 0}, {"steps": "many"}):
        with pytest.raises(ValueError, match="limits must be positive numbers"):
            LiveLimits(**bad)


def test_a_query_the_model_fails_on_is_500_without_retry_after(state):
    async def failing(kind: str, run_id: str, body: dict) -> dict:
        return {"error": "failed", "detail": "the model failed on this query; retrying will not help"}

    r = TestClient(build_api(state, live=failing)).post("/runs/fake/effects", json={"pairs": [PAIR]})
    assert r.status_code == 500 and "retry-after" not in r.headers and "will not help" in r.json()["detail"]


def test_a_query_that_fails_inside_the_model_fails_alone():
    """The batch it came in is answered query by query: the others get their answers, it a 500."""
    from serve.model import answer_batch

    class Run:
        def effects(self, bodies):
            if any(b.get("boom") for b in bodies):
                raise RuntimeError("Expected tensor for argument #1 'indices'")
            return [{"n": b["n"]} for b in bodies]

        def ablate(self, body):
            raise RuntimeError("bad")

        def activations(self, body):
            return {"tokens": []}

    items = [("effects", "r", {"n": 1}), ("effects", "r", {"n": 2, "boom": True}), ("ablate", "r", {}),
             ("activations", "r", {}), ("effects", "r", {"n": 3}), ("effects", "gone", {"n": 4})]
    out = answer_batch({"r": Run()}, {}, items)
    assert out[0] == {"n": 1} and out[4] == {"n": 3} and out[3] == {"tokens": []}
    assert out[1]["error"] == "failed" and "Expected tensor" in out[1]["detail"]
    assert out[2]["error"] == "failed" and out[5]["error"] == "unavailable"


def test_the_answer_cache_is_bounded_and_its_keys_normalised(state, monkeypatch):
    """Each distinct float filter used to add an answer to the cache: they are rounded to 4 significant
    digits, and the cache holds at most CACHE_ENTRIES answers and CACHE_BYTES bytes."""
    import serve.api as api

    client = TestClient(build_api(state))
    service = client.app.state.service

    def ask(x):
        r = client.get("/runs/fake/tasks/t1/ranking", params={"checkpoint": "step3", "min_relie": x})
        assert r.status_code == 200
        return r.json()

    assert ask(0.5) == ask(0.50000001) == ask(0.5000004) and len(service.cache) == 1
    monkeypatch.setattr(api, "CACHE_BYTES", 3 * service.cached_bytes)
    for i in range(40):
        ask(i / 1000)
    assert 0 < service.cached_bytes <= api.CACHE_BYTES and len(service.cache) <= 3


def test_health_keeps_run_names_behind_the_token_and_hosts_can_be_pinned(state):
    """/health is open: with a token it says ok without the run names. `allowed_hosts` answers only
    those Host headers (DNS rebinding of a workstation's service without a token)."""
    guarded = TestClient(build_api(state, token="s3cret")).get("/health")
    assert guarded.status_code == 200 and guarded.json()["runs"] is None and guarded.json()["status"] == "ok"
    pinned = TestClient(build_api(state, allowed_hosts=["127.0.0.1", "localhost"]), base_url="http://127.0.0.1")
    assert pinned.get("/health").status_code == 200
    assert pinned.get("/health", headers={"host": "evil.example"}).status_code == 400
    assert pinned.get("/runs", headers={"host": "evil.example"}).status_code == 400


def test_two_runs_of_one_name_are_refused_naming_both(tmp_path, capsys):
    """`--run keep/mini --run other/mini`: one used to replace the other silently."""
    import shutil

    from jobs.cli import main
    from tests.serve.conftest import write_fake_run

    first = write_fake_run(tmp_path / "keep" / "mini")
    second = tmp_path / "other" / "mini"
    shutil.copytree(first, second)
    state = ServiceState([str(first), str(second)], tmp_path / "cache")
    state.load()
    assert not state.ready and f"two runs are named mini: {first} and {second}" in state.error
    code = main(["serve", "--run", str(first), "--run", str(second), "--tracking-uri",
                 f"sqlite:///{tmp_path}/m.db", "--cache-dir", str(tmp_path / "cache")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("crossray: error")]
    assert code == 2 and f"two runs are named mini: {first} and {second}" in err[0], err
