"""Metrics: FVE both ways against naive loops, L0, dead latents, and spliced ΔCE on a real model."""

import pytest
import torch

from crossray.checkpoints import Family
from crossray.metrics import DeadLatents, fve, fve_mean_of_ratios, l0, spliced_ce
from crossray.models.crosscoder import Crosscoder
from crossray.models.layer import load_layer_model
from tests.conftest import save_tiny_family
from tests.helpers import make_cc_cfg


def test_fve_ratio_of_sums_by_hand():
    x = torch.tensor([[[1.0, 0.0]], [[3.0, 0.0]]])  # B=2, C=1, D=2; mean (2, 0); var sum = 2
    r = torch.tensor([[[1.0, 0.0]], [[2.0, 0.0]]])  # err sum = 1
    f = fve(x, r)
    assert f.per_checkpoint_C.tolist() == [pytest.approx(0.5)] and f.joint.item() == pytest.approx(0.5)


def test_fve_both_ways_against_naive_loops():
    x, r = torch.randn(50, 3, 8), torch.randn(50, 3, 8) * 0.3
    r = x + r
    mu = x.mean(0)
    for c in range(3):
        err = sum(((x[b, c] - r[b, c]) ** 2).sum() for b in range(50))
        var = sum(((x[b, c] - mu[c]) ** 2).sum() for b in range(50))
        assert fve(x, r).per_checkpoint_C[c].item() == pytest.approx(1 - (err / var).item(), rel=1e-5)
        ratios = [1 - ((x[b, c] - r[b, c]) ** 2).sum() / ((x[b, c] - mu[c]) ** 2).sum() for b in range(50)]
        paper = fve_mean_of_ratios(x, r).per_checkpoint_C[c].item()
        assert paper == pytest.approx(torch.stack(ratios).mean().item(), rel=1e-5)
    # a token at the batch mean makes the paper's metric explode; the standard one stays sane
    x[0] = mu
    assert fve_mean_of_ratios(x, r).joint.item() < fve(x, r).joint.item() - 1


def test_l0_and_dead_latents():
    lat = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]])
    assert l0(lat).item() == 1.5
    dead = DeadLatents(3, window_tokens=4)
    dead.update(lat.sum(0), 2)
    assert dead.tokens_since_fired_L.tolist() == [0, 2, 0] and dead.count() == 0
    dead.update(torch.zeros(3), 2)
    assert dead.mask().tolist() == [False, True, False]


def _identity_crosscoder(C: int, D: int) -> Crosscoder:
    """Latents (c, d, sign) read x_c[d] and write it back: a perfect ReLU reconstruction."""
    cc = Crosscoder(make_cc_cfg(n_checkpoints=C, d_model=D, n_latents=2 * C * D))
    with torch.no_grad():
        cc.W_enc_CDL.zero_()
        cc.W_dec_LCD.zero_()
        for c in range(C):
            for d in range(D):
                for s, sign in enumerate((1.0, -1.0)):
                    i = (c * D + d) * 2 + s
                    cc.W_enc_CDL[c, d, i] = sign
                    cc.W_dec_LCD[i, c, d] = sign
    return cc


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = save_tiny_family(tmp_path_factory.mktemp("ce"), "gpt_neox", ("step1", "step2"))
    fam = Family.from_dir(root)
    return [load_layer_model(fam, r, 1, device="cpu") for r in ("step1", "step2")]


def test_spliced_ce_perfect_and_zero_reconstruction(two_models):
    ids = torch.randint(0, 128, (2, 12))
    perfect = spliced_ce(_identity_crosscoder(2, 32), two_models, ids)
    torch.testing.assert_close(perfect.delta_ce_C, torch.zeros(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(perfect.ce_recovered_C, torch.ones(2), atol=1e-3, rtol=0)
    zero = Crosscoder(make_cc_cfg(n_checkpoints=2, d_model=32, n_latents=8))
    with torch.no_grad():
        zero.W_dec_LCD.zero_()
    res = spliced_ce(zero, two_models, ids, skip_first_position=False)
    torch.testing.assert_close(res.ce_spliced_C, res.ce_zero_C)
    torch.testing.assert_close(res.ce_recovered_C, torch.zeros(2), atol=1e-5, rtol=0)
    kept0 = spliced_ce(zero, two_models, ids, skip_first_position=True)
    assert not torch.allclose(kept0.ce_spliced_C, res.ce_spliced_C)  # position 0 left alone
    # ... in the zeroed pass too: one position-0 policy inside the ratio, so nothing is recovered
    torch.testing.assert_close(kept0.ce_spliced_C, kept0.ce_zero_C)
    torch.testing.assert_close(kept0.ce_recovered_C, torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(kept0.ce_clean_C, res.ce_clean_C)


def test_spliced_ce_respects_normalisation(two_models):
    cc = _identity_crosscoder(2, 32)
    cc.norm_factors_C.copy_(torch.tensor([0.25, 4.0]))
    res = spliced_ce(cc, two_models, torch.randint(0, 128, (2, 12)))
    torch.testing.assert_close(res.delta_ce_C, torch.zeros(2), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="3 models"):
        spliced_ce(Crosscoder(make_cc_cfg(n_checkpoints=2, d_model=32)), two_models + two_models[:1],
                   torch.randint(0, 128, (1, 4)))


def test_evaluate_matches_one_big_batch():
    from crossray.metrics import evaluate

    cc = Crosscoder(make_cc_cfg(n_checkpoints=3, d_model=8, n_latents=32))
    cc.norm_factors_C.copy_(torch.tensor([1.0, 2.0, 0.5]))
    x = torch.randn(300, 3, 8)
    row = evaluate(cc, x, batch_size=64)
    xn = cc.normalise(x)
    out = cc(xn)
    whole = fve(xn, out.recon_BCD)
    assert row["fve"] == pytest.approx(whole.joint.item(), abs=1e-5)
    assert [row[f"fve/{c}"] for c in range(3)] == pytest.approx(whole.per_checkpoint_C.tolist(), abs=1e-5)
    assert row["l0"] == pytest.approx(l0(out.latents_BL).item(), rel=1e-5)
    assert row["dead"] == int((out.latents_BL.sum(0) == 0).sum())


def test_spliced_ce_in_batches_equals_one_batch(two_models):
    """Held-out CE runs a few sequences at a time (240 x 1024 tokens would not fit one batch)."""
    from crossray.metrics import spliced_ce_policies

    cc = _identity_crosscoder(2, 32)
    with torch.no_grad():
        cc.W_dec_LCD.mul_(0.5)  # an imperfect reconstruction, so spliced differs from clean
    ids = torch.randint(0, 128, (5, 12))
    whole = spliced_ce_policies(cc, two_models, ids)
    batched = spliced_ce_policies(cc, two_models, ids, batch_sequences=2)
    for a, b in zip(whole, batched, strict=True):
        for field in ("ce_clean_C", "ce_spliced_C", "ce_zero_C"):
            torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-5, atol=1e-5)


def test_evaluation_runs_fp32_weights_whatever_extraction_ran_in(toy_extract_cfg, tmp_path, monkeypatch):
    """The held-out activations and ΔCE come from fp32 checkpoints even when the extraction ran in
    bf16 (the paper configs' old setting); `evaluate.dtype` says otherwise when asked."""
    import dataclasses

    import numpy as np

    from crossray import extract
    from crossray.config import CrosscoderConfig, EvaluateConfig
    from crossray.pipeline.stages import evaluate
    from crossray.store import save_crosscoder

    cc = Crosscoder(CrosscoderConfig(n_checkpoints=3, d_model=64, n_latents=32, seed=0,
                                     revisions=toy_extract_cfg.revisions, layer=2))
    save_crosscoder(cc, tmp_path / "cc")
    seen = []
    real = extract.CheckpointSetExtractor.__init__

    def spy(self, cfg, device):
        real(self, cfg, device)
        seen.append({str(p.dtype) for m in self.models for p in m.model.parameters()})

    monkeypatch.setattr(extract.CheckpointSetExtractor, "__init__", spy)
    bf16 = dataclasses.replace(toy_extract_cfg, compute_dtype="bfloat16")
    held_out = np.zeros((2, 16), dtype=np.int64)
    metrics = evaluate(bf16, str(tmp_path / "cc"), held_out, EvaluateConfig(eval_sequences=2),
                       device="cpu").metrics
    assert seen == [{"torch.float32"}] and "delta_ce_pos0/step1000" in metrics
    evaluate(bf16, str(tmp_path / "cc"), held_out, EvaluateConfig(eval_sequences=2, dtype="bfloat16"),
             device="cpu")
    assert seen[1] == {"torch.bfloat16"}
