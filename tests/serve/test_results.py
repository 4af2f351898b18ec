"""Queries over a run's tables: ranking, filters, pagination, names, cards, accuracy; no Ray."""

import pytest

from crossray.results import NotFound, ResultsError, RunIndex, load_folder, load_run
from tests.serve.conftest import IE, RELIE, REVS


@pytest.fixture
def index(fake_run):
    return RunIndex(load_folder(fake_run))


def test_ranking_by_relie_and_abs_ie(index):
    r = index.ranking("t1", "step3")
    assert [i["feature"] for i in r["items"]] == [0, 2, 3, 1]  # RelIE 0.7, 0.6, 1/3, 0.1
    assert [i["relie"] for i in r["items"]] == pytest.approx([0.7, 0.6, 1 / 3, 0.1])
    assert r["items"][0]["relie_by_checkpoint"] == pytest.approx(RELIE[0])
    assert r["checkpoint"] == "step3" and r["checkpoint_index"] == 2 and r["total"] == 4
    first = index.ranking("t1", 0, by="abs_ie")
    assert [i["feature"] for i in first["items"]] == [1, 2, 0, 3]  # |IE| 0.6, 0.02, 0.01, 0
    last = index.ranking("t1", -1, by="abs_ie")
    assert [i["feature"] for i in last["items"]] == [1, 0, 2, 3]  # |IE| 0.1, 0.07, 0.06, NaN last
    assert last["items"][-1]["ie"] is None
    tied = index.ranking("t2", "step1")  # every RelIE 1/3: ties in feature order
    assert [i["feature"] for i in tied["items"]] == [0, 1, 2, 3]


def test_ranking_filters_and_pages(index):
    assert [i["feature"] for i in index.ranking("t1", "step1", trajectory="emerging")["items"]] == [2, 0]
    assert [i["feature"] for i in index.ranking("t1", "step3", group="step3 specific")["items"]] == [0, 2]
    assert [i["feature"] for i in index.ranking("t1", "step3", min_relie=0.5)["items"]] == [0, 2]
    assert [i["feature"] for i in index.ranking("t1", "step2", min_abs_ie=0.1)["items"]] == [1]
    sel = index.ranking("t1", "step3", selected=True)
    assert [i["feature"] for i in sel["items"]] == [0, 2, 1] and all(i["selected"] for i in sel["items"])
    page = index.ranking("t1", "step3", offset=1, limit=2)
    assert [i["feature"] for i in page["items"]] == [2, 3] and page["total"] == 4
    assert index.ranking("t1", "step3", offset=10)["items"] == []


def test_names_and_not_found(index):
    assert index.checkpoint("step2") == 1 and index.checkpoint("2") == 2 and index.checkpoint(-3) == 0
    with pytest.raises(NotFound, match=r"unknown checkpoint 'step9'.*\['step1', 'step2', 'step3'\]"):
        index.checkpoint("step9")
    with pytest.raises(NotFound, match="unknown checkpoint '3'"):
        index.checkpoint("3")
    with pytest.raises(NotFound, match=r"unknown task 'nope'.*\['t1', 't2'\]"):
        index.ranking("nope", 0)
    with pytest.raises(NotFound, match=r"feature 4 out of range.*0\.\.3"):
        index.card(4)


def test_feature_card_matches_tables(index):
    card = index.card(0)
    assert card["checkpoints"] == REVS and card["trajectory"] == "emerging"
    assert card["decoder_norm"] == pytest.approx([0.1, 0.2, 0.3])
    assert card["relative_norm"] == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert card["relative_norm_pairs"] == [{"pair": "step1-step2", "share": 2 / 3, "all_zero": False},
                                           {"pair": "step1-step3", "share": 3 / 4, "all_zero": False},
                                           {"pair": "step2-step3", "share": 0.6, "all_zero": False}]
    pairs = index.card(2)["effects"]["t1"]["relie_pairs"]
    assert [p["share"] for p in pairs] == [0.5, 0.5, 0.75]
    assert [p["all_zero"] for p in pairs] == [True, False, False]  # the 0/0 pair says so
    assert card["effects"]["t1"]["ie"] == pytest.approx(IE[0]) and card["effects"]["t1"]["relie"] == RELIE[0]
    assert {c["pair"]: c["value"] for c in card["cosine"]} == {"step1-step2": 0.5, "step1-step3": 0.25,
                                                              "step2-step3": 0.75}
    assert card["contexts"]["joint"][0]["tokens"][1] == " dogs" and card["contexts"]["step1"] == []
    assert index.card(3)["effects"]["t1"]["ie"][2] is None  # NaN becomes null, never invalid JSON
    assert index.card(0, contexts=False)["contexts"] == {}


def test_info_and_accuracy(index):
    info = index.info()
    assert [c["tokens_seen"] for c in info["checkpoints"]] == [1000, 2000, 3000]
    assert info["checkpoints"][1]["fve"] == pytest.approx(0.81) and info["checkpoints"][1]["delta_ce"] is None
    assert [t["name"] for t in info["tasks"]] == ["t1", "t2"] and info["tasks"][0]["selected"] == 3
    acc = index.accuracy("t1")
    assert list(acc["tasks"]) == ["t1"]
    assert [(p["revision"], p["crosscoded"]) for p in acc["tasks"]["t1"]] == [
        ("step0", False), ("step1", True), ("step2", True), ("step3", True)]
    with pytest.raises(NotFound, match="unknown task 'x'"):
        index.accuracy("x")


def test_bad_sources(tmp_path, fake_run):
    with pytest.raises(ResultsError, match="not a finished crossray pipeline run"):
        load_folder(tmp_path)
    (fake_run / "attribute" / "effects" / "effects.parquet").unlink()
    with pytest.raises(ResultsError, match="effects.parquet is missing"):
        load_run(str(fake_run), tmp_path / "cache")
