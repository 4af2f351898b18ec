"""B1: crosscoder training (ReLU + decoder-norm-weighted L1), tokens/s, project path vs paper-style.

Reference: einsum encode/decode in fp32, per-model metrics with `.item()` every step, default Adam.
Project: `crossray.train.Trainer.step_batch` (flattened GEMMs, bf16 autocast with fp32 master
weights where the device runs bf16 fast, fused Adam, metrics every `metrics_every` steps).
FLOPs per token: 10 * n * D * F. The profile gives the project step's time by kind of op (GEMMs,
selection, casts, optimizer, elementwise).

    python bench/b1_train.py [--shapes 3x256x4096x2048,3x256x16384x1024] [--out b1.json]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    emit,
    failed,
    gemm_peak,
    gpu_figures,
    interleave,
    machine,
    parser,
    profile_shares,
    rel_err,
    summary,
)
from bench.reference import PaperCrosscoder, paper_l1_losses, paper_step  # noqa: E402
from crossray.config import CrosscoderConfig, TrainConfig  # noqa: E402
from crossray.models.crosscoder import Crosscoder  # noqa: E402
from crossray.train import Trainer, compute_losses  # noqa: E402


def build(n, D, F, B, device, precision="auto", metrics_every=100, activation="relu", k=32):
    cc_cfg = CrosscoderConfig(n_checkpoints=n, d_model=D, n_latents=F, seed=0, activation=activation,
                              k=k, dec_init_norm=1.0 if activation == "batchtopk" else 0.08,
                              threshold_start_step=10**9)
    cfg = TrainConfig(crosscoder=cc_cfg, n_steps=10**9, batch_size=B, lr=5e-5, l1_warmup_frac=0.0,
                      metrics_every=metrics_every, precision=precision)
    cc = Crosscoder(cc_cfg)
    with torch.no_grad():
        cc.b_enc_L.normal_(0, 0.01)
    trainer = Trainer(cc, cfg, device)
    ref = PaperCrosscoder(cc.W_enc_CDL.detach(), cc.W_dec_LCD.detach(), cc.b_enc_L.detach(),
                          cc.b_dec_CD.detach()).to(device)
    opt = torch.optim.Adam(ref.parameters(), lr=5e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return trainer, ref, opt, sched


def check_equivalence(n, D, F, B, device) -> dict:
    """Loss and reconstruction of the project path vs the reference on identical inputs."""
    x = torch.randn(B, n, D, device=device) * 2
    out = {}
    for precision in ("fp32", "bf16"):
        trainer, ref, _, _ = build(n, D, F, B, device, precision)
        with trainer._autocast():
            o = trainer.cc(x, mode="train")
        loss = compute_losses(trainer.cc, x, o, trainer.cfg, 0, None).loss
        ref_loss, ref_recon, _ = paper_l1_losses(ref, x, trainer.cfg.l1_coeff)
        out[precision] = {"loss_rel_err": rel_err(loss, ref_loss),
                          "recon_rel_err": rel_err(o.recon_BCD, ref_recon)}
    out["failed"] = failed({
        "fp32 loss and reconstruction within 1e-5": out["fp32"]["loss_rel_err"] <= 1e-5
        and out["fp32"]["recon_rel_err"] <= 1e-5,
        "bf16 loss and reconstruction within 1e-2": out["bf16"]["loss_rel_err"] <= 1e-2
        and out["bf16"]["recon_rel_err"] <= 1e-2})
    return out


def bench_shape(n, D, F, B, device, repeats) -> dict:
    equivalence = check_equivalence(n, D, F, B, device)
    trainer, ref, opt, sched = build(n, D, F, B, device)
    x = torch.randn(B, n, D, device=device) * 2
    l1 = trainer.cfg.l1_coeff
    times = interleave({
        "reference": lambda: paper_step(ref, opt, sched, x, lambda cc, xx: paper_l1_losses(cc, xx, l1)),
        "project": lambda: trainer.step_batch(x, log=lambda s, m: None),
    }, repeats, device=device)
    flops_per_token = 10 * n * D * F
    med = {k: statistics.median(v) for k, v in times.items()}
    peak_bf16 = gemm_peak(B, n * D, F, torch.bfloat16, device)
    peak_fp32 = gemm_peak(B, n * D, F, torch.float32, device)
    achieved = flops_per_token * B / med["project"]
    step = lambda: trainer.step_batch(x, log=lambda s, m: None)  # noqa: E731
    return {
        "shape": {"n": n, "D": D, "F": F, "B": B},
        "equivalence_failed": equivalence.pop("failed"), "equivalence": equivalence,
        "reference": summary(times["reference"]), "project": summary(times["project"]),
        "tokens_per_s": {k: B / v for k, v in med.items()},
        "speedup_median": med["reference"] / med["project"],
        "project_bf16": trainer.bf16,
        "gemm_peak_flops": {"fp32": peak_fp32, "bf16": peak_bf16},
        "project_flops": achieved,
        "fraction_of_bf16_gemm_peak": achieved / peak_bf16,
        "reference_fraction_of_fp32_gemm_peak": flops_per_token * B / med["reference"] / peak_fp32,
        **gpu_figures(flops_per_token, B / med["project"], step, device),
        "profile": profile_shares(step, device=device),
    }


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--shapes", default="3x256x4096x2048,3x256x16384x1024", help="n x D x F x B, ...")
    args = p.parse_args()
    device = torch.device(args.device)
    results = [bench_shape(*map(int, s.split("x")), device, args.repeats) for s in args.shapes.split(",")]
    emit({"benchmark": "B1 crosscoder training (ReLU/L1)", "machine": machine(), "results": results},
         args.out)


if __name__ == "__main__":
    main()
