"""Screening and automatic checkpoint selection (issue 6 groundwork, library only)."""

import pytest
import torch

from crossray.accuracy import accuracy_curves
from crossray.checkpoints import CheckpointError
from crossray.screen import activation_similarity, select_checkpoints


@pytest.fixture(scope="module")
def screened(toy_family, toy_dir, toy_tokenizer):
    revs = toy_family.available_revisions()
    rows, tasks = accuracy_curves(toy_family, [toy_dir / "tasks"], revs, device="cpu")
    acc: dict = {}
    for r in rows:
        acc.setdefault(r["task"], []).append(r["prefix_accuracy"])
    texts = [e.clean_prefix + e.clean_answer for t in tasks for e in t.examples[:40]]
    return revs, acc, activation_similarity(toy_family, revs, 2, toy_tokenizer, texts)


def test_similarity_matrix(screened):
    revs, _, sim = screened
    assert sim.shape == (len(revs), len(revs)) and torch.allclose(sim, sim.T)
    assert torch.allclose(sim.diagonal(), torch.ones(len(revs)))
    assert sim[0, 1] < 0.6 < sim[-2, -1]  # random init vs trained, then stable late in training


def test_selection_finds_the_phases_drops_included(screened):
    """On the toy, agreement across a prepositional phrase falls to 0 (the nearest-noun heuristic)
    before it is learned: the three checkpoints include that dip and the learned phase."""
    revs, acc, sim = screened
    sel = select_checkpoints(revs, acc, sim, n=3)
    pp = dict(zip(revs, acc["agreement_across_pp"], strict=True))
    print(f"\nselected {sel.revisions}:\n  " + "\n  ".join(sel.reasons))
    assert len(set(sel.revisions)) == 3 and list(sel.revisions) == sorted(sel.revisions, key=revs.index)
    assert min(pp[r] for r in sel.revisions) <= 0.25 and pp[sel.revisions[-1]] >= 0.9
    assert len(sel.reasons) == 3 and len(sel.phases) == 3
    assert "agreement_across_pp drops" in sel.reasons[1] and "agreement_across_pp rises" in sel.reasons[2]
    assert len(select_checkpoints(revs, acc, sim, n=2).revisions) == 2
    four = select_checkpoints(revs, acc, sim, n=4)
    assert len(set(four.revisions)) == 4 and min(pp[r] for r in four.revisions) <= 0.25


def test_segmentation_is_optimal_on_a_step_curve():
    from crossray.screen import segment

    curve = torch.tensor([[0.5], [0.5], [0.0], [0.0], [1.0], [1.0], [1.0]])  # chance, dip, learned
    assert segment(curve, 3) == [(0, 1), (2, 3), (4, 6)]
    assert segment(curve, 2) in ([(0, 3), (4, 6)], [(0, 1), (2, 6)])


def test_given_set_wins_and_bad_sets_are_refused(screened):
    revs, acc, sim = screened
    given = select_checkpoints(revs, acc, sim, given=["step64", "step1000"])
    assert given.revisions == ("step64", "step1000")
    with pytest.raises(CheckpointError, match=r"\['step7'\] are not among"):
        select_checkpoints(revs, acc, sim, given=["step0", "step7"])
    with pytest.raises(CheckpointError, match="at least 2 distinct"):
        select_checkpoints(revs, acc, sim, given=["step0", "step0"])
    with pytest.raises(CheckpointError, match="cannot select"):
        select_checkpoints(revs[:1], {"t": [0.5]}, None, n=3)


def test_selection_reads_sentence_curves_with_prefix_accuracy_beside():
    """Screening's curves are full-sentence accuracy where a task has sentence pairs (the paper's
    curves); prefix accuracy stays beside them; a task with no sentence pairs keeps its prefix curve."""
    from crossray.pipeline.stages import combine_screen

    def row(task, prefix, sentence, n_sentence=10):
        return {"task": task, "prefix_accuracy": prefix, "sentence_accuracy": sentence,
                "n_sentence": n_sentence}

    parts = [([row("a", 0.9, 0.6), row("b", 0.7, float("nan"), 0)], torch.eye(2)),
             ([row("a", 0.8, 0.4), row("b", 0.3, float("nan"), 0)], torch.eye(2))]
    screen, _ = combine_screen(["r1", "r2"], parts)
    assert screen.accuracy == {"a": [0.6, 0.4], "b": [0.7, 0.3]}
    assert screen.prefix_accuracy == {"a": [0.9, 0.8], "b": [0.7, 0.3]}


def test_selection_keeps_the_final_model_and_a_transient_dip():
    """On a curve shaped like the paper's Pythia ones (chance, a one-revision dip, learned with small
    late wiggles) the set ends at the final model, not the most typical late revision, and the dip
    is kept; revisions with identical weights count once (the later name stays)."""
    revs = ["s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7", "main"]
    curve = [0.5, 0.52, 0.49, 0.1, 0.9, 0.95, 0.96, 0.95, 0.99]
    sel = select_checkpoints(revs, {"t": curve}, None, n=3)
    assert sel.revisions == ("s0", "s3", "main"), sel  # s5 or s7 is the most typical of s4..main
    assert "main (the final model, always kept) stands for s4..main" in sel.reasons[2]
    same = select_checkpoints(revs, {"t": curve}, None, n=3, hashes=[*"abcdefgh", "h"])  # s7 == main
    assert same.revisions[-1] == "main" and "s7" not in same.phases[-1][0]
    with pytest.raises(CheckpointError, match="distinct weights"):
        select_checkpoints(["a", "b"], {"t": [0.1, 0.2]}, None, n=2, hashes=["h", "h"])
