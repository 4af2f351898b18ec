"""Extraction's arithmetic without Ray: the normalisation factors under both position-0 policies,
and the extraction key that keeps earlier extractions valid."""

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch

from crossray.config import CorpusConfig, ExtractConfig
from crossray.extract import (
    extraction_key,
    factors_from_shards,
    merge_norm_stats,
    norm_factor_policies,
    norm_stats,
)


def test_norm_factors_under_both_position0_policies():
    """Position 0 (the attention sink: a large norm) counts in the paper's estimate only; statistics
    of shards add up to those of the whole; sequences past the limit do not count."""
    D = 16
    acts = torch.ones(4, 5, 2, D)  # (N, S, C, D): every vector of norm 4 = sqrt(D) ...
    acts[:, 0] *= 10  # ... but position 0, of norm 40
    acts[3] *= 100  # a sequence past the limit
    whole = norm_stats(np.arange(4), acts, seq_limit=3)
    parts = merge_norm_stats([norm_stats(np.arange(2), acts[:2], 3),
                              norm_stats(np.arange(2, 4), acts[2:], 3)])
    assert parts == whole == {"first_sum": [120.0, 120.0], "first_count": 3, "rest_sum": [48.0, 48.0],
                              "rest_count": 12}
    factors = norm_factor_policies(whole, D)
    assert factors["without_position0"] == pytest.approx([1.0, 1.0])  # sqrt(D) / 4
    assert factors["with_position0"] == pytest.approx([4 / ((40 + 4 * 4) / 5)] * 2)  # mean norm 11.2
    shards = [{**norm_stats(np.arange(4), acts, 3), "rows": 1}]
    assert factors_from_shards(shards, D, True) == factors
    # shards from before both were kept: the one policy their rows stood for
    assert factors_from_shards([{"norm_sum": [8.0, 8.0], "norm_count": 2}], D, True) == \
        {"without_position0": [1.0, 1.0]}


def test_extraction_key_moves_only_with_the_policy_it_changes():
    """The paper's policy is another extraction; training's view keeps the key it had before both
    policies were kept, so existing shards stay valid."""
    cfg = ExtractConfig(family="toy", revisions=("a", "b"), layer=1,
                        corpus=CorpusConfig(source="x", seq_len=8, n_sequences=4))
    key = extraction_key(cfg, ["h1", "h2"], "c")
    before = hashlib.sha256(json.dumps(
        {"hashes": ["h1", "h2"], "layer": 1, "corpus": "c", "drop0": True, "dtype": cfg.storage_dtype,
         "compute": cfg.compute_dtype, "shard": cfg.shard_sequences, "norm": cfg.norm_sequences},
        sort_keys=True).encode()).hexdigest()[:16]
    assert key == before
    assert extraction_key(dataclasses.replace(cfg, norm_first_position=True), ["h1", "h2"], "c") != key
