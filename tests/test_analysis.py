"""Feature analyses: shares (RelDec) for N = 2, 3, 5, classes, groups, trajectories, cosine, contexts."""

import pytest
import torch

from crossray import analysis as A


def test_one_vs_all_by_hand_for_n_2_3_5():
    v2 = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    s2 = A.one_vs_all(v2)
    assert s2.share_LC.tolist() == [[0.25, 0.75], [0.5, 0.5]] and s2.all_zero_L.tolist() == [False, True]
    v3 = torch.tensor([[1.0, 1.0, 2.0]])
    assert A.one_vs_all(v3).share_LC.tolist() == [[0.25, 0.25, 0.5]]
    v5 = torch.tensor([[0.0, 1.0, 0.0, 0.0, 4.0], [0.0] * 5])
    s5 = A.one_vs_all(v5)
    assert s5.share_LC[0].tolist() == pytest.approx([0, 0.2, 0, 0, 0.8])
    assert s5.share_LC[1].tolist() == pytest.approx([0.2] * 5) and s5.all_zero_L[1]


def test_pairwise_matches_paper_order_and_fixes_nan():
    v = torch.tensor([[1.0, 3.0, 4.0], [0.0, 0.0, 2.0]])
    p = A.pairwise(v)
    assert sorted(p) == [(0, 1), (0, 2), (1, 2)]
    assert p[(0, 1)].share_LC.tolist() == [0.75, 0.5]  # B / (A + B); zero pair -> 0.5 (§16.6)
    assert p[(0, 1)].all_zero_L.tolist() == [False, True]
    assert p[(1, 2)].share_LC.tolist() == pytest.approx([4 / 7, 1.0])
    assert p[(0, 2)].share_LC.tolist() == pytest.approx([0.8, 1.0])
    assert len(A.pairwise(torch.rand(4, 5))) == 10


def test_rel_dec_uses_norms_of_unfolded_decoder():
    W = torch.zeros(2, 2, 3)
    W[0, 0, 0], W[0, 1, 1] = 3.0, 1.0
    W[1, 1] = torch.tensor([2.0, 2.0, 1.0])
    norms = A.decoder_norms(W)
    assert norms.tolist() == [[3.0, 1.0], [0.0, 3.0]]
    assert A.one_vs_all(norms).share_LC[:, 1].tolist() == [0.25, 1.0]


def test_classes_and_groups():
    assert A.classify(torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])).tolist() == [0, 0.5, 0.5, 0.5, 1]
    shares3 = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8], [0.34, 0.33, 0.33], [0.45, 0.45, 0.1],
                            [0.5, 0.2, 0.3], [0.2, 0.6, 0.2]])
    assert A.group_labels(shares3, ["1B", "4B", "286B"]) == [
        "1B specific", "286B specific", "shared by all", "1B-4B shared", "1B-286B shared", "others"]
    shares2 = torch.tensor([[0.2, 0.8], [0.5, 0.5], [0.9, 0.1]])
    assert A.group_labels(shares2, ["A", "B"]) == ["B specific", "shared by all", "A specific"]
    shares5 = torch.tensor([[0.35, 0.35, 0.3, 0.0, 0.0], [0.05, 0.05, 0.05, 0.05, 0.8]])
    assert A.group_labels(shares5, list("ABCDE")) == ["A-B-C shared", "E specific"]


def test_trajectory_classes():
    norms = torch.tensor([[0.0, 0.5, 1.0], [1.0, 1.0, 0.9], [1.0, 0.1, 0.0], [0.0, 1.0, 0.0],
                          [0.0, 0.0, 0.0]])
    assert A.trajectory_classes(norms) == ["emerging", "maintained", "discontinued", "transient",
                                           "absent"]


def test_decoder_cosine():
    W = torch.zeros(1, 3, 2)
    W[0, 0], W[0, 1], W[0, 2] = torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0]), torch.tensor([0.0, 5.0])
    cos = A.decoder_cosine(W)[0]
    assert cos.tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def test_top_contexts_stream_equals_global_topk():
    scores = torch.rand(2, 100, 6)
    ids = torch.arange(100) * 7
    top = A.TopContexts(n_latents=6, k=5, n_views=2)
    for i in range(0, 100, 30):
        top.update(scores[:, i:i + 30], ids[i:i + 30])
    want = scores.topk(5, dim=1)
    torch.testing.assert_close(top.values_VkL, want.values)
    assert torch.equal(top.ids_VkL, ids[want.indices])


def test_checkpoint_contributions_sum_to_pre_activations():
    W_enc = torch.randn(3, 4, 6)
    x = torch.randn(10, 3, 4)
    contrib = A.checkpoint_contributions(W_enc, x)
    torch.testing.assert_close(contrib.sum(0), torch.einsum("ncd,cdl->nl", x, W_enc))


def test_top_contexts_over_a_crosscoder():
    from crossray.models.crosscoder import Crosscoder
    from tests.helpers import make_cc_cfg

    cc = Crosscoder(make_cc_cfg(n_checkpoints=2, d_model=4, n_latents=3))
    with torch.no_grad():
        cc.W_enc_CDL.zero_()
        cc.W_enc_CDL[0, 0, 0] = 1.0  # latent 0 reads checkpoint 0, dim 0
        cc.W_enc_CDL[1, 1, 0] = 1.0  # ... and checkpoint 1, dim 1
    x = torch.zeros(6, 2, 4)
    x[2, 0, 0] = 5.0  # token 2 drives latent 0 through checkpoint 0
    x[4, 1, 1] = 3.0  # token 4 through checkpoint 1
    ids = torch.arange(6) + 100
    top = A.top_contexts(cc, [(x[:3], ids[:3]), (x[3:], ids[3:])], k=1)
    assert top.ids_VkL[:, 0, 0].tolist() == [102, 102, 104]  # joint, checkpoint 0, checkpoint 1
    assert top.values_VkL[:, 0, 0].tolist() == [5.0, 5.0, 3.0]


def test_context_windows_and_rows():
    """Top contexts carry the window's tokens and the feature's score at each of them."""
    from crossray.models.crosscoder import Crosscoder
    from tests.helpers import make_cc_cfg

    cc = Crosscoder(make_cc_cfg(n_checkpoints=2, d_model=4, n_latents=3))
    with torch.no_grad():
        cc.W_enc_CDL.zero_()
        cc.b_enc_L.zero_()
        cc.W_enc_CDL[0, 0, 0] = 1.0
    S = 5
    x = torch.zeros(2, S, 2, 4)
    x[1, 2, 0, 0], x[1, 3, 0, 0], x[1, 1, 0, 0] = 4.0, 1.0, 0.5  # seq 1: a peak at pos 2 with shoulders
    x[0, 4, 0, 0] = 2.0  # seq 0: a peak at the last position
    ids = (torch.arange(2)[:, None] * 2**20 + torch.arange(S)).reshape(-1)
    batches = [(x.reshape(-1, 2, 4)[:5], ids[:5]), (x.reshape(-1, 2, 4)[5:], ids[5:])]
    top = A.top_contexts(cc, batches, k=2)
    windows = A.window_scores(cc, top, batches, before=2, after=1)
    assert windows[0, 0, 0].tolist() == [0.0, 0.5, 4.0, 1.0]  # joint view, rank 0: seq 1 pos 0..3
    tokens = torch.arange(2 * S).view(2, S) + 100
    rows = A.context_rows(top, windows, tokens, lambda t: f"<{t}>", ["joint", "a", "b"], before=2)
    first = [r for r in rows if r["feature"] == 0 and r["view"] == "joint"]
    assert [(r["seq"], r["pos"], r["value"]) for r in first] == [(1, 2, 4.0), (0, 4, 2.0)]
    assert first[0]["tokens"] == ["<105>", "<106>", "<107>", "<108>"] and first[0]["target"] == 2
    assert first[1]["tokens"] == ["<102>", "<103>", "<104>"] and first[1]["scores"] == [0.0, 0.0, 2.0]
    assert first[1]["target"] == 2  # the window stops at the sequence's end
    assert not [r for r in rows if r["view"] == "b"]  # checkpoint 1 drives nothing: no positive context


def test_feature_rows_have_every_cosine_pair():
    from crossray.models.crosscoder import Crosscoder
    from tests.helpers import make_cc_cfg

    cc = Crosscoder(make_cc_cfg(n_checkpoints=3, d_model=4, n_latents=5, revisions=("a", "b", "c")))
    rows = A.feature_rows(cc)
    assert len(rows) == 5 and {"cos/a-b", "cos/a-c", "cos/b-c", "dec_norm/c", "reldec/a"} <= set(rows[0])
    assert sum(rows[0][f"reldec/{r}"] for r in "abc") == pytest.approx(1.0)
