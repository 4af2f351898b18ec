"""Studies without Ray: sets resolved from a config, each set's config, the union, the comparison."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from crossray import study as ST
from crossray.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SCREENED = ["step0", "step32", "step64", "step128", "step256", "step512", "step1000"]


def _config(tmp_path, sets: str, extra: str = ""):
    text = (ROOT / "configs" / "tiny-study.yaml").read_text()
    head, _, tail = text.partition("study:")
    body = tail.split("\nextract:", 1)[1]
    path = tmp_path / "study.yaml"
    path.write_text(f"{head}study:\n  sets: {sets}\n{extra}extract:{body}")
    return load_config(path)


def test_the_tiny_study_is_the_pythia_study_shape():
    cfg = load_config(ROOT / "configs" / "tiny-study.yaml")
    sets = ST.resolve_sets(cfg, list(cfg.pipeline.revisions), SCREENED)
    assert [s.revisions for s in sets] == [("step64", "step128"), ("step128", "step256"),
                                           ("step256", "step1000"), ("step128", "step256", "step1000")]
    assert ST.union(sets, SCREENED) == ["step64", "step128", "step256", "step1000"]
    assert sum(len(s.revisions) for s in sets) == 9  # revision-passes if the sets ran apart
    for s in sets:  # each set is a plain run of itself
        assert s.config.pipeline.revisions == s.revisions and s.config.pipeline.name == s.name
        assert not s.config.study.sets and s.config.train == cfg.train
    assert ST.columns(("step128", "step1000"), ST.union(sets, SCREENED)) == (1, 3)


def test_overrides_apply_to_their_set_only(tmp_path):
    cfg = _config(tmp_path, "[{revisions: [step64, step128], overrides: ['train.l1_coeff=3.0', "
                  "'attribution.steps=4']}, [step128, step256]]")
    a, b = ST.resolve_sets(cfg, list(cfg.pipeline.revisions), SCREENED)
    assert a.config.train.l1_coeff == 3.0 and a.config.attribution.steps == 4
    assert b.config.train.l1_coeff == cfg.train.l1_coeff
    assert b.config.attribution.steps == cfg.attribution.steps


@pytest.mark.parametrize(("sets", "message"), [
    ("[[step64]]", "two or more revisions"),
    ("[[step64, step64]]", "names a revision twice"),
    ("[[step64, step999]]", r"\['step999'\] are not among the screened"),
    ("[[step256, step64]]", "in training order"),
    ("[adjacent, [step64, step128]]", "given twice"),
    ("[{revisions: [step64, step128], overrides: ['pipeline.layer=1']}]", "train.<field>=<value>"),
    ("[{revisions: [step64, step128], overrides: ['train.l1_coef=3']}]", "l1_coef"),
    ("[{revisions: [step64, step128], overrides: ['train.lr=-1']}]", "study set step64-step128"),
    ("[sideways]", "sideways"),
])
def test_bad_sets_are_refused_naming_the_problem(tmp_path, sets, message):
    with pytest.raises(ValueError, match=message):
        cfg = _config(tmp_path, sets)
        ST.resolve_sets(cfg, list(cfg.pipeline.revisions), SCREENED)


def test_the_plan_sees_the_union(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny-study.yaml")
    union = ST.union_config(cfg)
    assert union.pipeline.revisions == ("step64", "step128", "step256", "step1000") and not union.study.sets
    planned = ST.planned_sets(_config(tmp_path, "[adjacent, all]"))
    assert [s.revisions for s in planned] == [
        ("step64", "step128"), ("step128", "step256"), ("step256", "step1000"),
        ("step64", "step128", "step256", "step1000")]


def _set(name, revisions, ie_rows, selected, decoders):
    effects = pd.DataFrame(ie_rows, columns=["task", "feature", "checkpoint_index", "ie", "relie", "group"])
    n = decoders.shape[0]
    features = pd.DataFrame({"feature": range(n), "group": ["shared by all"] * n})
    return ST.SetTables(name, revisions, [1000 * (i + 1) for i in range(len(revisions))], effects, features,
                        {"t": selected}, dict(enumerate(decoders)))


def test_the_comparison_counts_new_features_and_matches_decoders():
    # pair a-b: feature 0 only at b (new, IE 3), feature 1 at both (IE 1 at b): 3/4 of b's IE is new
    rows = [("t", 0, 0, 0.0, 0.0, "b specific"), ("t", 0, 1, 3.0, 1.0, "b specific"),
            ("t", 1, 0, 1.0, 0.5, "shared by all"), ("t", 1, 1, 1.0, 0.5, "shared by all")]
    dec = torch.zeros(2, 2, 4)
    dec[0, :, 0], dec[1, :, 1] = 1.0, 1.0
    pair = _set("a-b", ["a", "b"], rows, [0, 1], dec)
    [new] = ST.new_feature_shares(pair)
    assert new["share_from_new"] == pytest.approx(0.75) and new["new_features"] == 1
    other_dec = torch.zeros(2, 2, 4)
    other_dec[0, :, 0], other_dec[1, :, 2] = 1.0, 1.0  # feature 0 matches; feature 1 points elsewhere
    other = _set("b-c", ["b", "c"], [(t, f, c, ie, r, g) for t, f, c, ie, r, g in rows], [0, 1], other_dec)
    [match] = ST.matched_features(pair, other, k=2)
    assert match["revision"] == "b" and match["matched"] == 1
    assert match["mean_best_cosine"] == pytest.approx(0.5)
    timeline = ST.timeline(pair)
    assert [r["ie_mass"] for r in timeline] == [1.0, 4.0] and timeline[1]["top_specific_by_relie"] == 1
    tables = ST.compare([pair, other])
    assert set(tables) == {"timeline", "new_features", "matched"} and len(tables["timeline"]) == 4
