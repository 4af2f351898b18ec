"""The crosscoder model: init, forward against a naive einsum reference, folding, BatchTopK, JumpReLU."""

import pytest
import torch

from crossray.models.crosscoder import Crosscoder
from tests.helpers import make_cc_cfg


def naive_forward(cc: Crosscoder, x_BCD):
    """The paper's einsum formulation (crosscoder.py:encode/decode), ReLU."""
    pre = torch.einsum("bcd,cdl->bl", x_BCD, cc.W_enc_CDL) + cc.b_enc_L
    f = torch.relu(pre)
    return torch.einsum("bl,lcd->bcd", f, cc.W_dec_LCD) + cc.b_dec_CD, f


def test_paper_initialisation():
    cc = Crosscoder(make_cc_cfg(dec_init_norm=0.08))
    torch.testing.assert_close(cc.W_dec_LCD.norm(dim=-1), torch.full((64, 2), 0.08))
    assert torch.equal(cc.W_enc_CDL, cc.W_dec_LCD.permute(1, 2, 0))
    assert not cc.b_enc_L.any() and not cc.b_dec_CD.any()
    assert torch.equal(Crosscoder(make_cc_cfg()).W_dec_LCD, cc.W_dec_LCD)  # seeded


@pytest.mark.parametrize("C", [2, 3, 5])
def test_forward_matches_naive_einsum(C):
    cc = Crosscoder(make_cc_cfg(n_checkpoints=C))
    with torch.no_grad():
        cc.b_enc_L.normal_(0, 0.1)
        cc.b_dec_CD.normal_()
    x = torch.randn(8, C, 16)
    out = cc(x)
    recon, f = naive_forward(cc, x)
    torch.testing.assert_close(out.latents_BL, f, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.recon_BCD, recon, rtol=1e-5, atol=1e-6)


def test_bad_shapes_are_refused():
    cc = Crosscoder(make_cc_cfg())
    with pytest.raises(ValueError, match=r"C=2, D=16.*\(4, 3, 16\)"):
        cc(torch.randn(4, 3, 16))
    with pytest.raises(ValueError, match="shape"):
        cc(torch.randn(4, 2, 15))


def _with_factors(cfg, s=(0.5, 3.0)):
    cc = Crosscoder(cfg)
    with torch.no_grad():
        cc.norm_factors_C.copy_(torch.tensor(s))
        cc.b_dec_CD.normal_()
        cc.b_enc_L.normal_(0, 0.05)
        cc.W_dec_LCD.mul_(torch.rand(cfg.n_latents, cfg.n_checkpoints, 1) * 3)  # uneven norms
    return cc


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_fold_maps_raw_to_raw(activation):
    cc = _with_factors(make_cc_cfg(activation=activation))
    folded = cc.fold()
    raw = torch.randn(32, 2, 16) * 4
    expected = cc(cc.normalise(raw)).recon_BCD / cc.norm_factors_C[:, None]
    torch.testing.assert_close(folded(raw).recon_BCD, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(folded.W_dec_LCD.norm(dim=-1) * folded.dec_norm_scale_C,
                               cc.decoder_norms())


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fold_keeps_batchtopk_selection(mode):
    """§16.3: folding rescales ||W_dec|| per checkpoint; selection must not change."""
    cc = _with_factors(make_cc_cfg(activation="batchtopk", k=4))
    cc.threshold.fill_(0.5)
    raw = torch.randn(32, 2, 16)
    want = cc(cc.normalise(raw), mode=mode).latents_BL
    got = cc.fold()(raw, mode=mode).latents_BL
    assert torch.equal(got > 0, want > 0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_batchtopk_train_and_eval():
    cc = Crosscoder(make_cc_cfg(activation="batchtopk", k=3))
    x = torch.randn(10, 2, 16)
    with pytest.raises(ValueError, match="threshold is not set"):
        cc(x, mode="eval")
    before = {k: v.clone() for k, v in cc.state_dict().items()}
    out = cc(x, mode="train")
    assert int((out.latents_BL > 0).sum()) == 3 * 10  # exactly k * B over the whole batch
    assert int((cc(x, mode="train", k=5).latents_BL > 0).sum()) == 50
    scaled = out.pre_BL * cc.selection_norms()
    kept = scaled[out.latents_BL > 0]
    assert kept.min() >= scaled[out.latents_BL == 0].max()  # the top entries, by scaled value
    cc.threshold.fill_(float(kept.detach().median()))
    ev = cc(x, mode="eval")
    assert torch.equal(ev.latents_BL > 0, scaled > cc.threshold)
    after = cc.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k != "threshold")


def test_update_threshold_is_explicit_ema():
    cc = Crosscoder(make_cc_cfg(activation="batchtopk", k=2, threshold_beta=0.9))
    lat = torch.zeros(2, 64)
    lat[0, 1], lat[1, 3] = 2.0, 1.0
    norms = cc.selection_norms()
    cc.update_threshold(lat)
    first = min(2.0 * norms[1], 1.0 * norms[3])
    torch.testing.assert_close(cc.threshold, first)
    cc.update_threshold(lat * 2)
    torch.testing.assert_close(cc.threshold, 0.9 * first + 0.1 * 2 * first)


def test_sparse_decode_matches_dense_with_gradients():
    cc = Crosscoder(make_cc_cfg(activation="batchtopk", k=4))
    with torch.no_grad():
        cc.b_dec_CD.normal_()
    x = torch.randn(16, 2, 16)
    dense = cc(x, mode="train")
    (dense.recon_BCD ** 2).sum().backward()
    g_dense = cc.W_dec_LCD.grad.clone(), cc.W_enc_CDL.grad.clone()
    cc.zero_grad()
    sparse = cc(x, mode="train", sparse_decode=True)
    (sparse.recon_BCD ** 2).sum().backward()
    torch.testing.assert_close(sparse.recon_BCD, dense.recon_BCD, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cc.W_dec_LCD.grad, g_dense[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cc.W_enc_CDL.grad, g_dense[1], rtol=1e-5, atol=1e-6)


def test_jumprelu_gates_and_learns_threshold():
    cc = Crosscoder(make_cc_cfg(activation="jumprelu", jumprelu_init_threshold=0.2,
                                jumprelu_bandwidth=0.2))
    pre = torch.tensor([[0.05, 0.15, 0.25, 1.0] + [0.0] * 60])
    lat, _ = cc._activate(pre, "eval", None)
    assert lat[0, :4].tolist() == pytest.approx([0.0, 0.0, 0.25, 1.0])
    cc.jumprelu_penalty(cc._activate(pre, "train", None)[0]).backward()
    # the straight-through window (0.1, 0.3) around theta=0.2 holds latents 1 and 2; raising their
    # thresholds lowers the sparsity penalty, so the gradient is negative there and zero elsewhere
    grad = cc.log_threshold_L.grad
    assert grad[0] == 0 and grad[3] == 0 and not grad[4:].any()
    assert grad[1] < 0 and grad[2] < 0
