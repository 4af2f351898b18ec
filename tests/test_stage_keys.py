"""Each stage's key hashes exactly the inputs its function takes (`crossray.pipeline.graph`)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from crossray.config import load_config
from crossray.pipeline import graph as G
from crossray.pipeline import inputs as I
from crossray.schema import to_dict
from crossray.store import STAGES

ROOT = Path(__file__).resolve().parents[1]


class Value:
    """A stand-in input hashed by the value it holds."""

    def __init__(self, value):
        self.value = value

    def stage_identity(self):
        return self.value


def test_every_stage_is_registered_with_keyword_inputs_only():
    assert tuple(G.STAGE) == STAGES
    for name, stage in G.STAGE.items():
        params = list(inspect.signature(stage.fn).parameters.values())
        assert params[0].name == "run" and params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, name
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:]), name
        assert stage.inputs == [p.name for p in params[1:]] and stage.inputs, name


@pytest.mark.parametrize("name", STAGES)
def test_the_key_changes_with_every_input_and_takes_no_other(name):
    stage = G.STAGE[name]
    inputs = {k: Value(k) for k in stage.inputs}
    key = G.stage_key(stage, inputs)
    assert key == G.stage_key(stage, {k: Value(k) for k in reversed(stage.inputs)})  # order of the signature
    for k in stage.inputs:
        assert G.stage_key(stage, {**inputs, k: Value(k + "'")}) != key, f"{name}: {k} is not hashed"
    with pytest.raises(TypeError, match=f"stage {name} takes"):
        G.stage_key(stage, {**inputs, "extra": Value(1)})
    with pytest.raises(TypeError, match=f"stage {name} takes"):
        G.stage_key(stage, {k: v for k, v in inputs.items() if k != stage.inputs[0]})


def test_the_expensive_stages_keep_the_keys_of_existing_runs():
    """Extraction and training keys hash what they hashed before the stages were typed functions, so
    a run folder from an earlier crossray reuses its activations and crosscoder."""
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    hashes = {"step1": "a" * 16, "step4": "b" * 16}
    family = G.Family("toy", "/nonexistent/toy")
    ckpts = G.Checkpoints(family, hashes, "toy")
    extraction = G.Extraction(cfg.extract, "parquet")
    corpus = G.Corpus(cfg.extract.corpus)
    key = G.stage_key(G.STAGE["extract"], {"checkpoints": ckpts, "layer": 2, "corpus": corpus,
                                           "settings": extraction})
    before = I.digest("extract", list(hashes.items()), 2, I.corpus_fingerprint(cfg.extract.corpus),
                      {**to_dict(cfg.extract), "mode": "parquet", "max_disk_gb": None})
    assert key == before
    data = G.Extracted(G.S.ExtractResult(None, "m" * 16, [], "", [], 8, 1, 1, "stream"), ckpts,
                       ckpts.extract_config(2, cfg.extract))
    assert G.stage_key(G.STAGE["train"], {"data": data, "settings": cfg.train}) == \
        I.digest("train", "m" * 16, cfg.train)
