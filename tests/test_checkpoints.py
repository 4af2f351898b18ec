"""Families, revision naming, tokens seen, weight hashes, and checkpoint-set validation."""

import shutil

import pytest

from crossray.checkpoints import (
    CheckpointError,
    Family,
    format_tokens,
    parse_revision,
    resolve_checkpoint_set,
    weights_hash,
)
from tests.conftest import save_tiny_family


def test_pythia_naming():
    r = parse_revision("step512", "pythia")
    assert r.step == 512 and r.tokens_seen == 512 * 2_097_152 and r.label == "1B"
    assert parse_revision("step64", "pythia").label == "134M"
    assert parse_revision("main", "pythia").step == 143_000


def test_olmo_and_bloom_naming():
    r = parse_revision("step16000-tokens33B", "olmo")
    assert r.step == 16000 and r.tokens_seen == 33_000_000_000 and r.label == "33B"
    with pytest.raises(CheckpointError, match="stepN-tokensXB"):
        parse_revision("step16000", "olmo")
    assert parse_revision("global_step1000", "bloom").label == "550M"
    assert parse_revision("global_step100000", "bloom").label == "55B"
    assert parse_revision("main", "bloom").label == "341B"
    with pytest.raises(CheckpointError):
        parse_revision("step5", "bloom")


def test_format_tokens_matches_paper():
    assert format_tokens(128_000_000) == "128M"
    assert format_tokens(4_000_000_000) == "4B"
    assert format_tokens(999) == "999"


def test_local_family_revisions_and_hashes(tmp_path):
    root = save_tiny_family(tmp_path / "fam", "gpt_neox", ("step10", "step2", "step100"))
    fam = Family.from_dir(root, naming="pythia")
    assert fam.available_revisions() == ["step2", "step10", "step100"]
    hashes = {r: weights_hash(root / r) for r in fam.available_revisions()}
    assert len(set(hashes.values())) == 3
    assert weights_hash(root / "step2") == hashes["step2"]  # stable
    cset = resolve_checkpoint_set(fam, ["step2", "step100"])
    assert [d["weights_sha256"] for d in cset.describe()] == [hashes["step2"], hashes["step100"]]


def test_identical_checkpoints_are_refused_by_name(tmp_path):
    root = save_tiny_family(tmp_path / "fam", "gpt_neox", ("step1", "step2"))
    shutil.copytree(root / "step1", root / "step3")
    fam = Family.from_dir(root)
    with pytest.raises(CheckpointError, match=r"'step1' and 'step3'.*identical"):
        resolve_checkpoint_set(fam, ["step1", "step2", "step3"])
    with pytest.raises(CheckpointError, match="at least 2"):
        resolve_checkpoint_set(fam, ["step1"])


def test_missing_revision_names_it(tmp_path):
    fam = Family.from_dir(save_tiny_family(tmp_path / "fam", "gpt_neox", ("step1",)))
    with pytest.raises(CheckpointError, match=r"revision 'step9' .*not found.*available: step1"):
        fam.location("step9")
    with pytest.raises(CheckpointError, match="does not exist"):
        Family.from_dir(tmp_path / "nope")


def test_hub_family_uses_repo_and_revision():
    fam = Family("pythia-1b", "EleutherAI/pythia-1b", ("step512", "main"))
    assert not fam.is_local
    assert fam.location("step512") == ("EleutherAI/pythia-1b", "step512")
    bloom = Family("bloom", "bigscience/bloom-1b1-intermediate", ("global_step1000",),
                   naming="bloom", tokenizer="bigscience/bloom-1b1")
    assert bloom.tokenizer_location("global_step1000") == ("bigscience/bloom-1b1", None)
