"""Training: losses by hand, schedules, aux-k sign, ground-truth recovery, exact resume, bad input."""

import dataclasses

import pytest
import torch

from crossray import analysis as A
from crossray.config import CrosscoderConfig, TrainConfig
from crossray.models.crosscoder import Crosscoder
from crossray.schema import from_dict
from crossray.train import (
    NonFiniteBatchError,
    Trainer,
    aux_k_loss,
    compute_losses,
    estimate_norm_factors,
    k_at,
    l1_coeff_at,
    lr_factor_at,
)
from tests.helpers import (
    EXPECTED_GROUP,
    make_cc_cfg,
    make_train_cfg,
    planted_batches,
    planted_dictionary,
)


def test_losses_by_hand():
    cfg = make_train_cfg(make_cc_cfg(n_checkpoints=2, d_model=2, n_latents=2), l1_coeff=2.0,
                         l1_warmup_frac=0.0)
    cc = Crosscoder(cfg.crosscoder)
    with torch.no_grad():
        cc.W_enc_CDL.zero_()
        cc.W_enc_CDL[0, 0, 0] = 1.0  # latent 0 reads x[c=0, d=0]
        cc.W_dec_LCD.zero_()
        cc.W_dec_LCD[0, 0] = torch.tensor([3.0, 4.0])  # norm 5 at checkpoint 0
        cc.W_dec_LCD[0, 1] = torch.tensor([0.0, 1.0])  # norm 1 at checkpoint 1
    x = torch.tensor([[[2.0, 0.0], [0.0, 0.0]], [[-1.0, 0.0], [1.0, 1.0]]])
    out = cc(x, mode="train")
    # token 0: f0 = 2, recon = [[6, 8], [0, 2]]; err^2 = 16 + 64 + 0 + 4 = 84
    # token 1: f0 = 0, recon = 0; err^2 = 1 + 1 + 1 = 3 ; L2 = (84 + 3) / 2
    # L1 = mean_b f0 * (5 + 1) = (2 * 6) / 2 = 6 ; loss = L2 + 2 * L1
    losses = compute_losses(cc, x, out, cfg, step=10, dead_L=None)
    assert losses.l2.item() == pytest.approx(43.5)
    assert losses.sparsity.item() == pytest.approx(12.0)
    assert losses.loss.item() == pytest.approx(55.5)


def test_schedules():
    cfg = make_train_cfg(n_steps=1000, l1_coeff=2.0, l1_warmup_frac=0.05, lr_decay_frac=0.2)
    assert l1_coeff_at(0, cfg) == 0 and l1_coeff_at(25, cfg) == pytest.approx(1.0)
    assert l1_coeff_at(50, cfg) == 2.0 and l1_coeff_at(999, cfg) == 2.0
    assert lr_factor_at(799, cfg) == 1.0 and lr_factor_at(900, cfg) == pytest.approx(0.5)
    assert lr_factor_at(1000, cfg) == 0.0
    topk = make_train_cfg(make_cc_cfg(activation="batchtopk", k=10, k_init=110, k_anneal_steps=100))
    assert [k_at(s, topk) for s in (0, 50, 100, 500)] == [110, 60, 10, 10]


def test_aux_k_uses_the_true_residual():
    """§16.1: dead latents must learn x - x^, so a decoder along +residual scores lower loss."""
    cfg = make_cc_cfg(n_checkpoints=2, d_model=4, n_latents=4, activation="batchtopk", k=1)
    cc = Crosscoder(cfg)
    x = torch.zeros(3, 2, 4)
    x[:, 0, 0] = torch.tensor([1.0, 2.0, 3.0])
    recon = torch.zeros_like(x)  # residual = x, along +e0 of checkpoint 0
    pre = torch.zeros(3, 4)
    pre[:, 3] = torch.tensor([1.0, 2.0, 3.0])
    dead = torch.tensor([False, False, False, True])
    with torch.no_grad():
        cc.W_dec_LCD[3] = 0
        cc.W_dec_LCD[3, 0, 0] = 1.0
    aligned = aux_k_loss(cc, x, recon, pre, dead)
    with torch.no_grad():
        cc.W_dec_LCD[3, 0, 0] = -1.0
    opposed = aux_k_loss(cc, x, recon, pre, dead)
    assert aligned.item() == pytest.approx(0.0, abs=1e-6) and opposed.item() > 1.0
    assert aux_k_loss(cc, x, recon, pre, torch.zeros(4, dtype=torch.bool)).item() == 0.0


def test_aux_k_loss_and_gradients_equal_the_dense_computation():
    """The aux-k reconstruction gathers the k_aux chosen decoder rows; loss and gradients are those of
    the dense (B, L) @ (L, C*D) product of the paper's code."""
    cc = Crosscoder(make_cc_cfg(n_checkpoints=2, d_model=16, n_latents=64, activation="batchtopk", k=4))
    x, recon = torch.randn(8, 2, 16), torch.randn(8, 2, 16)
    pre = torch.relu(torch.randn(8, 64)).requires_grad_()
    dead = torch.rand(64) < 0.5
    loss = aux_k_loss(cc, x, recon, pre, dead)
    loss.backward()
    got = (pre.grad.clone(), cc.W_dec_LCD.grad.clone())
    pre.grad, cc.W_dec_LCD.grad = None, None
    k_aux = min(16 // 2, int(dead.sum()))
    idx = (pre * cc.selection_norms()).masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1).indices
    acts = torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx))
    resid = (x - recon).flatten(1)
    dense = (resid - acts @ cc.W_dec_LCD.reshape(64, 32)).pow(2).sum(-1).mean() / \
        (resid - resid.mean(0)).pow(2).sum(-1).mean()
    dense.backward()
    torch.testing.assert_close(loss, dense)
    assert got[0].abs().sum() > 0 and got[1].abs().sum() > 0
    torch.testing.assert_close(got[0], pre.grad)
    torch.testing.assert_close(got[1], cc.W_dec_LCD.grad)


@pytest.mark.parametrize("d_model", [32, 512])
@pytest.mark.parametrize("activation", ["relu", "batchtopk", "jumprelu"])
def test_ground_truth_recovery(activation, d_model):
    """Planted shared / emerging / discontinued / middle features across 3 checkpoints, at a small
    width and a wider one (a feature's normalised contribution grows with sqrt(D), so a sparsity
    penalty fitted at one width can fail at another); every activation with its published defaults
    (JumpReLU: Anthropic's January 2025 recipe as it stands in the config)."""
    kinds, dirs_FCD = planted_dictionary(n_each=8, d_model=d_model)
    data = planted_batches(dirs_FCD, n_batches=600)
    topk = activation == "batchtopk"
    cc_cfg = CrosscoderConfig(n_checkpoints=3, d_model=d_model, n_latents=64, activation=activation,
                              dec_init_norm=1.0 if topk else 0.08, k=3, threshold_start_step=50, seed=0)
    cfg = TrainConfig(crosscoder=cc_cfg, n_steps=600, batch_size=512, lr=3e-3, metrics_every=600,
                      dead_window_tokens=512 * 20)
    cc = Crosscoder(cc_cfg)
    cc.norm_factors_C.copy_(estimate_norm_factors(data, 10))
    logs = []
    Trainer(cc, cfg, "cpu").fit(data, log=lambda s, m: logs.append(m), progress=False)
    W_FK = torch.nn.functional.normalize(cc.fold().W_dec_LCD.detach().flatten(1), dim=-1)
    planted = torch.nn.functional.normalize(dirs_FCD.flatten(1), dim=-1)
    best, idx = (planted @ W_FK.T).max(1)
    recovered = best > 0.9
    shares = A.one_vs_all(cc.decoder_norms().detach()).share_LC[idx]
    labels = A.group_labels(shares, ["A", "B", "C"])
    match = [lab == EXPECTED_GROUP[k] for lab, k, ok in zip(labels, kinds, recovered, strict=True) if ok]
    print(f"\n{activation} D={d_model}: recovered {recovered.float().mean():.2f}, class match "
          f"{sum(match) / len(match):.2f}, final fve {logs[-1]['fve']:.3f}, l0 {logs[-1]['l0']:.2f}")
    assert recovered.float().mean() >= 0.9
    assert sum(match) / len(match) >= 0.9
    true_l0 = 0.06 * len(kinds)  # each planted feature is on with probability 0.06
    if activation == "jumprelu":  # JumpReLU learns its sparsity: it must land near the truth
        assert abs(logs[-1]["l0"] - true_l0) <= 0.5 * true_l0, (logs[-1]["l0"], true_l0)
    assert logs[-1]["fve"] > 0.9 and all(logs[-1][f"fve/{c}"] > 0.9 for c in range(3))


def _run(cfg, data, trainer=None, start=0):
    trainer = trainer or Trainer(Crosscoder(cfg.crosscoder), cfg, "cpu")
    trainer.fit(data[start:], progress=False)
    return trainer


@pytest.mark.parametrize("activation", ["relu", "batchtopk"])
def test_resume_is_exact(tmp_path, activation):
    cc_cfg = make_cc_cfg(activation=activation, k=4, threshold_start_step=3)
    cfg = make_train_cfg(cc_cfg, n_steps=20, dead_window_tokens=128)
    data = [torch.randn(64, 2, 16) for _ in range(20)]
    full = _run(cfg, data)
    half_cfg = make_train_cfg(cc_cfg, n_steps=20, dead_window_tokens=128)
    half = Trainer(Crosscoder(cc_cfg), half_cfg, "cpu")
    half.fit(data[:10], progress=False)  # stops when the data runs out, mid-schedule
    half.save(tmp_path / "ckpt")
    resumed = Trainer.resume(tmp_path / "ckpt", device="cpu")
    assert resumed.step == 10 and resumed.batches_consumed == 10
    resumed.fit(data[resumed.batches_consumed:], progress=False)
    for k, v in full.cc.state_dict().items():
        assert torch.equal(v, resumed.cc.state_dict()[k]), k
    assert torch.equal(full.dead.tokens_since_fired_L, resumed.dead.tokens_since_fired_L)


def test_log_and_save_cadence():
    cfg = make_train_cfg(n_steps=20, metrics_every=5, checkpoint_every=10)
    logged, saved = [], []
    Trainer(Crosscoder(cfg.crosscoder), cfg, "cpu").fit(
        [torch.randn(64, 2, 16) for _ in range(20)], log=lambda s, m: logged.append(s),
        save=lambda t: saved.append(t.step), progress=False)
    assert logged == [5, 10, 15, 20] and saved == [10, 20]


def test_nan_batch_is_refused_and_state_untouched():
    cfg = make_train_cfg(n_steps=5)
    trainer = Trainer(Crosscoder(cfg.crosscoder), cfg, "cpu")
    data = [torch.randn(64, 2, 16) for _ in range(5)]
    trainer.fit(data[:2], progress=False)
    before = {k: v.clone() for k, v in trainer.cc.state_dict().items()}
    bad = torch.randn(64, 2, 16)
    bad[7, 1, 3] = float("nan")
    with pytest.raises(NonFiniteBatchError, match=r"batch 2 contains NaN/Inf \(rows \[7\]"):
        trainer.fit([bad], progress=False)
    assert trainer.step == 2 and all(torch.equal(v, trainer.cc.state_dict()[k]) for k, v in before.items())
    trainer.fit(data[2:], progress=False)  # training goes on after the bad batch
    assert trainer.step == 5


def test_wrong_shapes_are_refused():
    cfg = make_train_cfg()
    trainer = Trainer(Crosscoder(cfg.crosscoder), cfg, "cpu")
    with pytest.raises(ValueError, match="C=2, D=16"):
        trainer.fit([torch.randn(64, 3, 16)], progress=False)
    with pytest.raises(ValueError, match="differs"):
        Trainer(Crosscoder(make_cc_cfg(n_latents=8)), cfg, "cpu")


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        make_cc_cfg(activation="gelu")
    with pytest.raises(ValueError, match=r"activation: 'gelu' is not one of"):
        from_dict(CrosscoderConfig, {"n_checkpoints": 2, "d_model": 4, "n_latents": 8,
                                     "activation": "gelu"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['n_latent'\]"):
        from_dict(CrosscoderConfig, {"n_checkpoints": 2, "d_model": 4, "n_latent": 8})
    with pytest.raises(ValueError, match=r"d_model: expected int, got str"):
        from_dict(CrosscoderConfig, {"n_checkpoints": 2, "d_model": "4", "n_latents": 8})
    with pytest.raises(ValueError, match="n_checkpoints must be >= 2"):
        make_cc_cfg(n_checkpoints=1)
    cfg = from_dict(TrainConfig, {"crosscoder": {"n_checkpoints": 3, "d_model": 4, "n_latents": 8},
                                  "n_steps": 10, "lr": 1})
    assert cfg.crosscoder.n_checkpoints == 3 and cfg.lr == 1.0


def test_norm_factors_follow_the_paper():
    x = torch.randn(256, 2, 16)
    x[:, 1] *= 10
    s = estimate_norm_factors([x[:128], x[128:]], n_batches=2)
    normed = x * s[None, :, None]
    torch.testing.assert_close(normed.norm(dim=-1).mean(0), torch.full((2,), 4.0))  # sqrt(16)


def _dead_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from crossray.train import Trainer
    from tests.helpers import make_cc_cfg, make_train_cfg

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cfg = make_train_cfg(make_cc_cfg(n_checkpoints=2, d_model=16, n_latents=64), n_steps=5,
                         dead_window_tokens=10**6)
    trainer = Trainer(Crosscoder(cfg.crosscoder), cfg, "cpu")
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # worker 0 sees data that fires latents, worker 1 only zeros (nothing fires)
        x = torch.randn(64, 2, 16, generator=g) if rank == 0 else torch.zeros(64, 2, 16)
        trainer.step_batch(x)
    torch.save(trainer.dead.tokens_since_fired_L, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def _jumprelu_init_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from crossray.train import Trainer
    from tests.helpers import make_cc_cfg, make_train_cfg

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cfg = make_train_cfg(make_cc_cfg(activation="jumprelu", jumprelu_init_firing=0.2))
    trainer = Trainer(Crosscoder(cfg.crosscoder), cfg, "cpu")
    x = torch.randn(256, 2, 16, generator=torch.Generator().manual_seed(rank)) * (1 + 3 * rank)
    trainer.init_from_first_batch(x)
    torch.save(trainer.cc.b_enc_L.detach(), f"{out}/{rank}.pt")
    alone = Crosscoder(cfg.crosscoder)
    alone.init_jumprelu_bias(x, 0.2)
    torch.save(alone.b_enc_L.detach(), f"{out}/alone{rank}.pt")
    dist.destroy_process_group()


def test_jumprelu_bias_init_is_the_workers_mean(tmp_path):
    """Each data-parallel worker sets b_enc from its own first batch; they start from the mean."""
    import torch.multiprocessing as mp

    from tests.helpers import free_port

    mp.spawn(_jumprelu_init_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    got0, got1, a0, a1 = (torch.load(tmp_path / f"{n}.pt") for n in ("0", "1", "alone0", "alone1"))
    assert not torch.allclose(a0, a1)  # the batches differ
    torch.testing.assert_close(got0, got1)
    torch.testing.assert_close(got0, (a0 + a1) / 2)


def test_dead_latents_count_tokens_over_all_workers(tmp_path):
    """Under data parallelism the dead-latent window counts the global batch: every worker holds the
    same counters, and a latent that fired on any worker is alive on all."""
    import torch.multiprocessing as mp

    from tests.helpers import free_port

    mp.spawn(_dead_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert torch.equal(rank0, rank1)
    assert (rank1 < 5 * 128).any()  # fired on worker 0, so not counted as idle on worker 1
    assert (rank1 % 128 == 0).all()  # counted in global batches: 2 workers x 64 tokens per step


def _trainer(n_checkpoints: int, seed: int, steps: int = 6) -> Trainer:
    cc = CrosscoderConfig(n_checkpoints=n_checkpoints, d_model=8, n_latents=16, seed=seed)
    cfg = TrainConfig(crosscoder=cc, n_steps=steps, batch_size=32, lr=1e-2, metrics_every=2,
                      checkpoint_every=3)
    return Trainer(Crosscoder(cfg.crosscoder), cfg, "cpu")


def test_crosscoders_train_together_on_their_columns_and_resume_exactly(tmp_path):
    """A study's sets: one batch stream of 3 checkpoints, a pair on columns 1-2 and the triple on all;
    each trains as it would alone on its columns, and a stop after step 3 resumes to the same weights."""
    from crossray.train import fit_together

    torch.manual_seed(0)
    data = [torch.randn(32, 3, 8) for _ in range(6)]
    alone = _trainer(2, 1)
    alone.fit([x[:, [1, 2]] for x in data], progress=False)
    together = {"pair": _trainer(2, 1), "triple": _trainer(3, 2)}
    fit_together(together, data, {"pair": [1, 2]}, progress=False)
    torch.testing.assert_close(together["pair"].cc.W_dec_LCD, alone.cc.W_dec_LCD)
    first = {"pair": _trainer(2, 1), "triple": _trainer(3, 2)}
    fit_together(first, data[:3], {"pair": [1, 2]}, progress=False)
    for name, t in first.items():
        t.save(tmp_path / name)
    resumed = {name: Trainer.resume(tmp_path / name, device="cpu") for name in first}
    fit_together(resumed, data[resumed["pair"].batches_consumed:], {"pair": [1, 2]}, progress=False)
    for name in together:
        assert resumed[name].step == 6
        torch.testing.assert_close(resumed[name].cc.W_enc_CDL, together[name].cc.W_enc_CDL)


def test_a_crosscoder_with_a_bad_batch_is_set_aside_and_the_others_go_on():
    from crossray.train import check_shared, fit_together

    data = [torch.randn(32, 3, 8) for _ in range(6)]
    data[2][:, 0] = float("nan")  # checkpoint 0's activations go bad in batch 2
    trainers = {"pair": _trainer(2, 1), "triple": _trainer(3, 2)}
    failed = fit_together(trainers, data, {"pair": [1, 2]}, progress=False)
    assert list(failed) == ["triple"] and "NaN/Inf" in failed["triple"]
    assert trainers["pair"].step == 6 and trainers["triple"].step == 2
    with pytest.raises(ValueError, match=r"set b differs in train.batch_size"):
        check_shared({"set a": trainers["pair"].cfg,
                      "set b": dataclasses.replace(trainers["triple"].cfg, batch_size=64)})
