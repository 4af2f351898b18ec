"""Live queries over real HTTP on the tiny run (both sources: the registered model in MLflow and the
pipeline folder), through the Serve app's model deployment: the answers reproduce what the pipeline
stored, bad input is a 4xx, and the page's "try it" panel works in headless Chromium."""

import asyncio
import json

import httpx
import numpy as np
import pandas as pd
import pytest

from crossray.config import load_config
from crossray.tasks import read_jsonl
from tests.helpers import ARTIFACTS

pytestmark = pytest.mark.ray
TASK = "simple_agreement"


@pytest.fixture(scope="module")
def task_rows(toy_dir) -> list[dict]:
    return read_jsonl(toy_dir / "tasks" / f"{TASK}.jsonl")


def test_effects_of_a_tasks_examples_reproduce_the_stored_table(served, task_rows):
    url, results, folder = served
    effects = pd.read_parquet(folder / "attribute" / "effects" / "effects.parquet")
    ie_LC = effects[effects.task == TASK].pivot(index="feature", columns="checkpoint_index", values="ie")
    want_top = ie_LC.abs().max(axis=1).sort_values(ascending=False, kind="stable").index[:20].tolist()
    summary = json.loads((folder / "attribute" / "effects" / "summary.json").read_text())["tasks"][TASK]
    c = httpx.Client(base_url=url, timeout=60)
    for run in (results.mlflow_run_id, "tiny"):
        r = c.post(f"/runs/{run}/effects", json={"pairs": task_rows, "top": 20})
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["run"] == run and got["examples"] == summary["examples"] == len(task_rows)
        assert got["checkpoints"] == results.select.revisions
        assert [f["feature"] for f in got["features"]] == want_top  # the same top features
        for f in got["features"]:
            want = ie_LC.loc[f["feature"]].to_numpy()
            np.testing.assert_allclose(f["ie"], want, rtol=0, atol=1e-4 * np.abs(want).max())
            shares = np.abs(want) / np.abs(want).sum()
            np.testing.assert_allclose(f["relie"], shares, atol=1e-4)
        np.testing.assert_allclose(got["logit_diff"], -np.array(summary["metric"]), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got["error_ie"], summary["error_effect"], rtol=1e-4, atol=1e-6)
    # chosen features, fewer pairs: the mean over those pairs only
    r = c.post("/runs/tiny/effects", json={"pairs": task_rows[:5], "features": [want_top[0], 7]}).json()
    assert [f["feature"] for f in r["features"]] == [want_top[0], 7] and r["examples"] == 5
    assert r["features"][0]["ie"] != got["features"][0]["ie"]


def test_ablate_reproduces_the_attribute_stage_deltas(served, task_rows):
    url, results, folder = served
    info = json.loads((folder / "attribute" / "effects" / "summary.json").read_text())["tasks"][TASK]
    selected, want = info["selected"], np.array(info["ablation"]["deltas"])
    r = httpx.post(f"{url}/runs/{results.mlflow_run_id}/ablate",
                   json={"pairs": task_rows, "features": selected}, timeout=60)
    assert r.status_code == 200, r.text
    got = r.json()
    deltas = np.array([f["delta"] for f in got["per_feature"]])
    assert [f["feature"] for f in got["per_feature"]] == selected
    np.testing.assert_allclose(deltas, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    before = np.array([b["logit_diff"] for b in got["before"]])
    np.testing.assert_allclose(before, -np.array(info["metric"]), rtol=1e-4, atol=1e-6)
    assert all(0 <= s["accuracy"] <= 1 for s in got["before"] + got["after"])
    # every selected feature at once moves the logit difference at the last checkpoint
    assert abs(got["after"][-1]["logit_diff"] - got["before"][-1]["logit_diff"]) > 1e-3
    one = httpx.post(f"{url}/runs/tiny/ablate", json={"pairs": task_rows[:20], "features": selected[:2],
                                                      "checkpoint": -1}, timeout=60).json()
    assert one["checkpoints"] == results.select.revisions[-1:] and len(one["before"]) == 1


def test_activations_of_a_training_sequence_match_the_stored_top_contexts(served, tracked_run):
    url, results, folder = served
    from crossray.corpus import load_sequences
    from crossray.models.layer import load_tokenizer

    cfg = load_config(tracked_run[1])
    tokenizer = load_tokenizer(results.family, results.select.revisions[0])
    tokens, _ = load_sequences(cfg.extract.corpus, tokenizer)
    contexts = pd.read_parquet(folder / "analyse" / "tables" / "top_contexts.parquet")
    joint = contexts[(contexts.view == "joint") & (contexts["rank"] == 0)]
    joint = joint.sort_values("value", ascending=False)
    checked = 0
    for row in joint.head(3).itertuples():
        ids = tokens[row.seq, : row.pos + 1].tolist()
        text = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        r = httpx.post(f"{url}/runs/tiny/activations", json={"text": text, "top": 10}, timeout=30)
        assert r.status_code == 200, r.text
        got = r.json()["tokens"]
        assert [t["id"] for t in got] == ids  # the text re-tokenizes to the training sequence
        at = {a["feature"]: a["value"] for a in got[row.pos]["joint"]}
        assert row.feature in at, (row.feature, at)
        assert at[row.feature] == pytest.approx(row.value, rel=2e-2)
        assert len(got[row.pos]["checkpoints"]) == 3
        checked += 1
    assert checked == 3


def test_live_bad_input_is_4xx(served, task_rows):
    url, results, _ = served
    c = httpx.Client(base_url=url, timeout=30)
    run = results.mlflow_run_id
    pair = task_rows[0]
    long_answer = {"clean_prefix": "The man", "clean_answer": " waits near the",
                   "patch_answer": " wait near the"}
    for path, body, status, says in [
        ("effects", {"pairs": []}, 422, "at least 1"),
        ("effects", {"pairs": [pair] * 257}, 422, "at most 256 pairs"),
        ("effects", {"pairs": [pair], "features": list(range(65))}, 422, "at most 64 features"),
        ("effects", {"pairs": [pair], "top": 101}, 422, "at most 100"),
        ("effects", {"pairs": [pair], "steps": 65}, 422, "at most 64 integrated-gradient steps"),
        ("effects", {"pairs": [pair], "features": [512]}, 404, "feature 512 out of range"),
        ("effects", {"pairs": [{"clean_prefix": "The man"}]}, 422, "missing or non-string field"),
        ("effects", {"pairs": [{"clean_prefix": "The man", "clean_answer": 3, "patch_answer": " x"}]}, 422,
         "missing or non-string field(s) ['clean_answer']"),
        ("effects", {"pairs": [{"colour": "red"}]}, 422, "cannot tell the task format"),
        ("effects", {"pairs": [long_answer]}, 422, "answer_too_long"),
        ("effects", {"pairs": [pair], "model": "/etc/passwd"}, 422, "extra"),
        ("ablate", {"pairs": [pair], "features": []}, 422, "at least 1"),
        ("ablate", {"pairs": [pair], "features": [1], "checkpoint": "step999"}, 404, "unknown checkpoint"),
        ("activations", {"text": ""}, 422, "at least 1"),
        ("activations", {"text": "x" * 2001}, 422, "at most 2000 characters"),
        ("activations", {"text": "The dogs", "top": 0}, 422, "greater than or equal to 1"),
    ]:
        r = c.post(f"/runs/{run}/{path}", json=body)
        assert r.status_code == status, (path, body, r.text[:300])
        assert says in json.dumps(r.json()["detail"]), (says, r.text[:300])
    usable = {"clean_prefix": "The man near the queens", "clean_answer": " waits", "patch_answer": " wait"}
    r = c.post(f"/runs/{run}/effects", json={"pairs": [usable, long_answer]}).json()
    assert "examples" in r, r  # the unusable pair is reported, the rest answered
    assert r["examples"] == 1 and r["skipped"] == {"answer_too_long": 1}
    assert c.post("/runs/nope/effects", json={"pairs": [pair]}).status_code == 404


def together_and_alone(url: str, sent: list[tuple[str, dict]]) -> tuple[list, list]:
    """The answers to live queries (kind, body) sent at once (so they share batches), then one by one."""
    async def together():
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            return await asyncio.gather(*[c.post(f"/runs/tiny/{kind}", json=body) for kind, body in sent])

    got = asyncio.run(together())
    with httpx.Client(base_url=url, timeout=60) as c:
        return got, [c.post(f"/runs/tiny/{kind}", json=body) for kind, body in sent]


def test_queries_sent_together_get_each_their_own_answer(served, task_rows):
    """Queries that arrive together share model batches (a table replica sends them in one hop, the
    model runs their pairs through shared passes): each still gets the answer it gets alone, and a bad
    one in the batch is its own 4xx."""
    url, _, folder = served
    effects = pd.read_parquet(folder / "attribute" / "effects" / "effects.parquet")
    strength = effects[effects.task == TASK].groupby("feature").ie.apply(lambda v: v.abs().max())
    features = strength.sort_values(ascending=False, kind="stable").index[:3].tolist()  # with effects
    sent = [("effects", {"pairs": [row], "features": features}) for row in task_rows[:8]]
    sent += [("effects", {"pairs": [{"clean_prefix": "The man", "clean_answer": " waits near the",
                                     "patch_answer": " wait near the"}]}),
             ("ablate", {"pairs": task_rows[:3], "features": features}),
             ("activations", {"text": "The dogs near the man run"})]
    got, alone = together_and_alone(url, sent)
    assert [r.status_code for r in got] == [r.status_code for r in alone] == [200] * 8 + [422, 200, 200]
    ies = [np.array([f["ie"] for f in r.json()["features"]]) for r in alone[:8]]
    assert not all(np.allclose(ies[0], ie) for ie in ies[1:])  # the pairs differ, so mixing would show
    for r, want in zip(got[:8], ies, strict=True):
        np.testing.assert_allclose([f["ie"] for f in r.json()["features"]], want, rtol=1e-4,
                                   atol=1e-5 * np.abs(want).max())
    assert got[8].json()["detail"] == alone[8].json()["detail"]
    assert got[10].json()["tokens"] == alone[10].json()["tokens"]
    np.testing.assert_allclose([b["logit_diff"] for b in got[9].json()["after"]],
                               [b["logit_diff"] for b in alone[9].json()["after"]], rtol=1e-4)


def test_try_it_panel_in_headless_chromium(served, page):
    url, results, _ = served
    browser = page  # on the app's page already
    browser.wait_for("document.querySelectorAll('tr.feature-row').length")
    typed = {"try-prefix": "The boys near the queen", "try-good": "run", "try-bad": "runs"}
    for field, value in typed.items():
        browser.eval(f"document.getElementById('{field}').value = {json.dumps(value)}")
    browser.click("document.getElementById('try-run')")
    rows = browser.wait_for("document.querySelectorAll('tr.live-row').length", timeout=60)
    run = browser.eval("document.getElementById('run').value")
    want = httpx.post(f"{url}/runs/{run}/effects", json={"pairs": [
        {"clean_prefix": "The boys near the queen", "clean_answer": " run", "patch_answer": " runs"}],
        "top": 15}, timeout=30).json()
    shown = browser.eval("[...document.querySelectorAll('tr.live-row')].map(r => +r.dataset.feature)")
    assert rows == len(want["features"]) > 0 and shown == [f["feature"] for f in want["features"]]
    browser.click("document.querySelector('tr.live-row')")
    title = browser.wait_for("(() => { const t = document.getElementById('card-title').textContent;"
                             " return t.startsWith('Feature ') && t; })()")
    assert title == f"Feature {shown[0]}"
    browser.click("document.getElementById('ablate')")
    cells = browser.wait_for("document.querySelectorAll('#ablation-table td.num').length", timeout=60)
    assert cells == 2 * len(want["checkpoints"])  # before and after at every checkpoint
    assert browser.screenshot(ARTIFACTS / "serve_try_it.png").stat().st_size > 10_000


def test_hostile_pairs_are_refused_alone_and_at_once(served, task_rows):
    """An empty prefix (it crashed the whole batch it came in), a 40,000-character prefix with 64
    steps (it ran for minutes on the model replica) and pairs over the request's token budget: each a
    422 naming the row, whether sent alone or together with a good query, which gets its own answer."""
    url, _, _ = served
    reply = {"clean_answer": " waits", "patch_answer": " wait"}
    empty = {"clean_prefix": "", **reply}
    huge = {"clean_prefix": "The man near the queens " * 1700, **reply}  # 40,800 characters
    long = {"clean_prefix": ("The man near the queens " * 80).strip(), **reply}  # 1,919: under the cap
    good = {"pairs": task_rows[:2], "features": [0, 7, 27]}
    sent = [("effects", good), ("effects", {"pairs": [empty]}),
            ("ablate", {"pairs": [empty], "features": [1]}), ("effects", {"pairs": [huge], "steps": 64}),
            ("effects", {"pairs": [long] * 30})]
    got, alone = together_and_alone(url, sent)
    for r in (got, alone):
        assert [x.status_code for x in r] == [200, 422, 422, 422, 422], [x.text[:200] for x in r]
        assert "retry-after" not in r[1].headers
        assert r[1].json()["detail"][0]["loc"] == ["body", "pairs", 0, "clean_prefix"]
        assert r[3].json()["detail"][0]["loc"] == ["body", "pairs", 0, "clean_prefix"]  # by the table layer
        assert "40800 characters; at most 2000" in r[3].json()["detail"][0]["msg"]
        budget = r[4].json()["detail"][0]["msg"]
        assert "pairs[" in budget and "at most 8192 per request" in budget, budget
    np.testing.assert_allclose([f["ie"] for f in got[0].json()["features"]],
                               [f["ie"] for f in alone[0].json()["features"]], rtol=1e-4, atol=1e-6)


def test_model_work_stops_at_the_deadline(served, task_rows):
    """A query whose deadline has passed leaves the model batches (its answer says so); a query batched
    with it is answered in full."""
    import time

    from crossray.live import LiveRun

    _, _, folder = served
    run = LiveRun("tiny", folder)
    late, on_time = run.effects([{"pairs": task_rows[:40], "limits": {"deadline": time.time() - 1}},
                                 {"pairs": task_rows[:3], "features": [0, 7]}])
    assert late["error"] == "unavailable" and "deadline" in late["detail"]
    assert on_time["examples"] == 3 and [f["feature"] for f in on_time["features"]] == [0, 7]
