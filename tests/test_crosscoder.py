"""The crosscoder model: init, forward against a naive einsum reference, folding, BatchTopK, JumpReLU."""

import pytest
import torch

from crossray.models.crosscoder import Crosscoder
from crossray.models.crosscoder import _flat_topk_indices as FLAT  # the real one, for the spy
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


@pytest.mark.parametrize("with_aux", [False, True])
def test_sparse_decode_matches_dense_with_gradients(with_aux):
    """The sparse training path (decode fed from the selection) gives the dense path's reconstruction,
    latents and gradients, also through the aux-k loss on the pre-activations."""
    from crossray.train import aux_k_loss

    cc = Crosscoder(make_cc_cfg(activation="batchtopk", k=4))
    with torch.no_grad():
        cc.b_dec_CD.normal_()
        cc.b_enc_L.normal_(0, 0.1)
    x = torch.randn(16, 2, 16)

    def backward(out):
        loss = (out.recon_BCD ** 2).sum()
        if with_aux:
            dead_L = torch.arange(cc.cfg.n_latents) % 3 == 0
            loss = loss + aux_k_loss(cc, x, out.recon_BCD, out.pre_BL, dead_L, out.norms_L)
        loss.backward()

    dense = cc(x, mode="train")
    backward(dense)
    g_dense = cc.W_dec_LCD.grad.clone(), cc.W_enc_CDL.grad.clone()
    cc.zero_grad()
    sparse = cc(x, mode="train", sparse_decode=True)
    backward(sparse)
    torch.testing.assert_close(sparse.recon_BCD, dense.recon_BCD, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse.latents_BL, dense.latents_BL)
    torch.testing.assert_close(sparse.pre_BL, dense.pre_BL)
    torch.testing.assert_close(cc.W_dec_LCD.grad, g_dense[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cc.W_enc_CDL.grad, g_dense[1], rtol=1e-5, atol=1e-6)


def test_jumprelu_gates_and_learns_threshold():
    cc = Crosscoder(make_cc_cfg(activation="jumprelu", jumprelu_init_threshold=0.2,
                                jumprelu_bandwidth=0.2, jumprelu_ste_input=False))
    pre = torch.tensor([[0.05, 0.15, 0.25, 1.0] + [0.0] * 60])
    lat, _ = cc._activate(pre, "eval", None)
    assert lat[0, :4].tolist() == pytest.approx([0.0, 0.0, 0.25, 1.0])
    cc.jumprelu_penalty(cc._activate(pre, "train", None)[0]).backward()
    # the straight-through window (0.1, 0.3) around theta=0.2 holds latents 1 and 2; raising their
    # thresholds lowers the sparsity penalty, so the gradient is negative there and zero elsewhere
    grad = cc.log_threshold_L.grad
    assert grad[0] == 0 and grad[3] == 0 and not grad[4:].any()
    assert grad[1] < 0 and grad[2] < 0


def test_jumprelu_is_anthropics_january_2025_recipe():
    """Published defaults (c = 4, epsilon = 2, log theta = 0.1, lambda_P = 3e-6, lambda_S ramped over
    all of training); the jump's straight-through gradient reaches the pre-activations; the
    pre-activation loss by hand; b_enc starts so each latent fires on the configured share."""
    import math

    from tests.helpers import make_train_cfg

    cfg = make_cc_cfg(activation="jumprelu")
    assert (cfg.jumprelu_tanh_scale, cfg.jumprelu_bandwidth, cfg.jumprelu_preact_coeff) == (4.0, 2.0, 3e-6)
    assert math.log(cfg.jumprelu_init_threshold) == pytest.approx(0.1)
    assert make_train_cfg(cfg).sparsity_warmup_frac == 1.0
    assert make_train_cfg(make_cc_cfg()).sparsity_warmup_frac == 0.05  # ReLU: the paper's
    cc = Crosscoder(make_cc_cfg(activation="jumprelu", jumprelu_init_threshold=1.0, jumprelu_bandwidth=2.0))
    pre = torch.tensor([[0.5, 1.5, 2.5, -1.0] + [0.0] * 60], requires_grad=True)
    lat, _ = cc._activate(pre, "train", None)
    lat.sum().backward()
    # d/dx [x H(x - 1)] = H + x K / 2, with the window K = 1 on (0, 2)
    assert pre.grad[0, :4].tolist() == pytest.approx([0.25, 1 + 0.75, 1.0, 0.0])
    norms = cc.selection_norms().detach()
    want = (torch.relu(1.0 - pre.detach()) * norms).sum()
    assert cc.jumprelu_preact_loss(pre.detach(), norms).item() == pytest.approx(want.item(), rel=1e-5)
    fresh = Crosscoder(make_cc_cfg(activation="jumprelu", jumprelu_init_firing=0.25))
    x = torch.randn(400, 2, 16)
    fresh.init_jumprelu_bias(x, 0.25)
    firing = (fresh.pre_acts(x) > fresh.log_threshold_L.exp()).float().mean(0)
    assert firing.min() >= 0.24 and firing.max() <= 0.26


@pytest.mark.parametrize("batch", ["random", "one_row_wins", "few_rows_win", "many_rows_win", "few_positive",
                                   "k_over_width"])
def test_batch_topk_selection_equals_a_flat_top_k(batch, monkeypatch):
    """The one-pass selection picks exactly the set a top-k over the whole flattened batch picks, on
    random batches and on batches where some rows hold many winners (without that full top-k), and
    where many rows do (with it)."""
    from crossray.models import crosscoder as M

    full = []
    monkeypatch.setattr(M, "_flat_topk_indices", lambda s, n: full.append(n) or FLAT(s, n))
    gen = torch.Generator().manual_seed(7)
    B, L, k = 256, 2048, 32
    scaled = torch.rand(B, L, generator=gen)
    match batch:
        case "one_row_wins":  # row 3 holds more winners than its candidates
            scaled[3] += 10
        case "few_rows_win":  # rows 0, 16, ... hold 4k winners each: their whole rows join the pool
            scaled[::16, : 4 * k] += 5
        case "many_rows_win":  # half the rows: a full top-k it is
            scaled[::2, : 4 * k] += 5
        case "few_positive":  # fewer positive entries than winners: the threshold is 0
            scaled = torch.relu(scaled - 0.99)
        case "k_over_width":
            k = L // 2 + 1
    n = k * B
    got = M.batch_topk_mask(scaled, n)
    flat = scaled.flatten()
    want = torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, flat.topk(n).indices, True).view_as(scaled)
    assert int(got.sum()) == n
    if batch == "few_positive":  # zeros tie: the same positive entries, and n in all
        assert torch.equal(got & (scaled > 0), want & (scaled > 0))
    else:
        assert torch.equal(got, want)
    # the full top-k only where per-row candidates cannot tell
    assert len(full) == (batch in ("many_rows_win", "k_over_width"))


def test_batch_topk_selection_with_bf16_ties_is_a_top_k_without_the_full_sort(monkeypatch):
    """bf16 scores tie often: the selection is still a top-k (nothing left out beats a winner, n in
    all), and ties at the boundary do not send it to the full top-k."""
    from crossray.models import crosscoder as M

    full = []
    monkeypatch.setattr(M, "_flat_topk_indices", lambda s, n: full.append(n) or FLAT(s, n))
    scaled = torch.relu(torch.randn(512, 4096, generator=torch.Generator().manual_seed(3))).bfloat16()
    n = 32 * 512
    got = M.batch_topk_mask(scaled, n)
    assert int(got.sum()) == n and scaled[got].min() >= scaled[~got].max() and not full



@pytest.mark.parametrize("shift", [0.0, -50.0])  # winners all positive; every pre-activation negative
def test_batchtopk_latents_and_gradient_equal_relu_then_mask(shift):
    """Training latents and the encoder's gradient equal ReLU(pre) masked by the selection, also when
    the winners tie at zero."""
    from crossray.models.crosscoder import batch_topk_mask

    cc = Crosscoder(make_cc_cfg(activation="batchtopk", k=3))
    with torch.no_grad():
        cc.b_enc_L.fill_(shift)
    x = torch.randn(10, 2, 16)
    out = cc(x, mode="train")
    (out.latents_BL * torch.arange(out.latents_BL.shape[1])).sum().backward()
    got = cc.W_enc_CDL.grad.clone()
    cc.W_enc_CDL.grad = None
    pre = torch.relu(cc.pre_acts(x))
    want_latents = pre * batch_topk_mask((pre * cc.selection_norms()).detach(), 30)
    (want_latents * torch.arange(pre.shape[1])).sum().backward()
    assert (out.latents_BL >= 0).all()
    torch.testing.assert_close(out.latents_BL, want_latents)
    torch.testing.assert_close(got, cc.W_enc_CDL.grad)
