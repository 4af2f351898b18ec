"""The embedded default: the toy grammar, its build, and agreement emerging across revisions."""

import json
import logging

import pytest

from crossray.accuracy import accuracy_curves
from crossray.toy.build import ToyConfig, build_toy_family
from crossray.toy.grammar import PARADIGMS, Grammar, answer_words, minimal_pair


def test_grammar_is_seeded_and_agrees():
    a, b = Grammar(3), Grammar(3)
    docs = [a.document(5) for _ in range(20)]
    assert docs == [b.document(5) for _ in range(20)]
    text = " ".join(docs)
    # agreement holds in the corpus: no singular determiner before a plural noun and vice versa
    assert " these dog " not in text and " this dogs " not in text
    assert "The dog is" in text or "The dog was" in text or "dog " in text


@pytest.mark.parametrize("uid", sorted(PARADIGMS))
def test_minimal_pairs_are_blimp_rows(uid):
    g = Grammar(1)
    rows = [minimal_pair(g, uid, i) for i in range(40)]
    for r in rows:
        assert r["one_prefix_method"] is True and r["two_prefix_method"] is False
        assert r["sentence_good"] != r["sentence_bad"]
        assert r["sentence_good"].startswith(r["one_prefix_prefix"] + " " + r["one_prefix_word_good"])
        assert r["sentence_bad"].startswith(r["one_prefix_prefix"] + " " + r["one_prefix_word_bad"])
        assert r["one_prefix_word_good"] in answer_words()
    # balanced singular/plural subjects, so a constant-bias model scores chance
    goods = {r["one_prefix_word_good"] for r in rows}
    assert len(goods) > 1


def test_unknown_paradigm_is_refused():
    with pytest.raises(ValueError, match="unknown paradigm"):
        minimal_pair(Grammar(0), "nope", 0)


def test_toy_family_layout_and_tokenizer(toy_dir, toy_tokenizer):
    meta = json.loads((toy_dir / "family.json").read_text())
    assert meta["revisions"][0] == "step0" and meta["revisions"][-1] == "step1000"
    for rev in meta["revisions"]:
        assert (toy_dir / rev / "config.json").exists()
        assert (toy_dir / rev / "model.safetensors").exists()
    assert sorted(p.stem for p in (toy_dir / "tasks").glob("*.jsonl")) == sorted(PARADIGMS)
    # byte-level: any English text tokenizes and round-trips; answers are single tokens
    text = "Zebras quietly juggle 42 quixotic xylophones!"
    assert toy_tokenizer.decode(toy_tokenizer.encode(text)) == text
    assert all(len(toy_tokenizer.encode(" " + w)) == 1 for w in answer_words())
    assert toy_tokenizer.bos_token_id is None or toy_tokenizer.encode("The")[0] != toy_tokenizer.bos_token_id


def test_toy_build_is_cached(toy_dir, caplog):
    stamp = (toy_dir / "family.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="crossray.toy.build"):
        again = build_toy_family(None, ToyConfig())
    assert again == toy_dir and (toy_dir / "family.json").stat().st_mtime_ns == stamp
    assert "already built" in caplog.text


def test_toy_config_validation():
    with pytest.raises(ValueError, match="end at max_step"):
        ToyConfig(max_step=10, checkpoint_steps=(0, 5))
    assert ToyConfig(seed=1).key() != ToyConfig(seed=2).key()


def test_agreement_emerges(toy_family, toy_dir):
    """Simple agreement rises from chance to learned; the relative-clause task is learned later."""
    rows, _ = accuracy_curves(toy_family, [toy_dir / "tasks"], device="cpu")
    curve = {}
    for r in rows:
        curve.setdefault(r["task"], []).append(r["prefix_accuracy"])
    simple, rc = curve["simple_agreement"], curve["agreement_across_relative_clause"]
    print(json.dumps(curve))
    assert simple[0] <= 0.65 and simple[-1] >= 0.9
    first_learned = lambda c: next(i for i, a in enumerate(c) if a >= 0.9)  # noqa: E731
    assert first_learned(rc) > first_learned(simple)
    assert all(c[-1] >= 0.9 for c in curve.values())
