"""Crosscoder training loop over any iterator of (B, C, D) batches (method.md §5, with §16 fixes).

Per step: loss = L2 + sparsity, where L2 = mean_b sum_{c,d} (x^ - x)^2 and sparsity is
- relu:      lambda(t) * mean_b sum_i f_i * sum_c ||W_dec[i, c]||   (L1 warm-up over the first 5%),
- jumprelu:  lambda(t) * mean_b sum_i tanh(c * f_i * sum_c ||W_dec[i, c]||), a smooth L0, with the
             thresholds learned through the jump's straight-through gradient, plus the pre-activation
             loss lambda_P * mean_b sum_i ReLU(theta_i - h_i) * sum_c ||W_dec[i, c]|| (Anthropic's
             January 2025 recipe; lambda ramps over all of training, b_enc starts from the data),
- batchtopk: auxk_alpha * aux-k loss on dead latents, with the residual sign fixed (x - x^, §16.1);
then gradient clipping, Adam, and an LR that is constant and decays linearly over the last 20%.

Fast path: flattened GEMMs (in the model), bf16 autocast with fp32 master weights where the device
runs bf16 fast, a fused Adam, metrics every `metrics_every` steps (no per-step host syncs), and
sparse decoding for BatchTopK. Resuming from a saved state continues exactly like an uninterrupted
run given the same data order: the state records how many batches were consumed.

The loop takes `log(step, metrics)` and `save(trainer)` callables, so it runs over a list in tests
and over a Ray Data shard in jobs.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from crossray import metrics as M
from crossray import store
from crossray.config import TrainConfig, TrainSettings
from crossray.models.crosscoder import Crosscoder, ForwardOutput, norm_factors

logger = logging.getLogger(__name__)


class NonFiniteBatchError(ValueError):
    """A batch holds NaN or Inf; the training state was not touched."""


class Losses(NamedTuple):
    loss: Tensor
    l2: Tensor
    sparsity: Tensor
    aux: Tensor
    latent_sums_L: Tensor
    """Sum of each latent over the batch (detached): > 0 means it fired (latents are >= 0)."""


# -- schedules ------------------------------------------------------------------------------------

def l1_coeff_at(step: int, cfg: TrainConfig) -> float:
    warm = cfg.sparsity_warmup_frac * cfg.n_steps
    return cfg.l1_coeff * min(1.0, step / warm) if warm > 0 else cfg.l1_coeff


def lr_factor_at(step: int, cfg: TrainConfig) -> float:
    decay = cfg.lr_decay_frac * cfg.n_steps
    start = cfg.n_steps - decay
    return 1.0 if step < start or decay == 0 else max(0.0, 1.0 - (step - start) / decay)


def k_at(step: int, cfg: TrainConfig) -> int:
    cc = cfg.crosscoder
    if cc.k_init is None or step >= cc.k_anneal_steps:
        return cc.k
    return max(cc.k, round(cc.k_init - (cc.k_init - cc.k) * step / cc.k_anneal_steps))


@lru_cache(maxsize=1)
def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.precision != "auto":
        return cfg.precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and _cpu_has_fast_bf16()


# -- losses ---------------------------------------------------------------------------------------

def aux_k_loss(cc: Crosscoder, x_BCD: Tensor, recon_BCD: Tensor, pre_BL: Tensor, dead_L: Tensor,
               norms_L: Tensor | None = None) -> Tensor:
    """Dead latents reconstruct the residual x - x^ (sign fixed, §16.1), normalised by its variance."""
    n_dead = int(dead_L.sum())
    if n_dead == 0:
        return x_BCD.new_zeros(())
    C, D, L = cc.shape
    k_aux = min(D // 2, n_dead)
    resid = (x_BCD - recon_BCD).detach().flatten(1).float()  # (B, C*D)
    norms_L = cc.selection_norms() if norms_L is None else norms_L
    with torch.no_grad():  # scores only choose: no graph, in the pre-activations' dtype
        scaled = (pre_BL * norms_L.to(pre_BL.dtype)).masked_fill(~dead_L, float("-inf"))
        idx_BK = scaled.topk(k_aux, dim=-1).indices
    # the k_aux chosen decoder rows per token, summed (no b_dec): k_aux / L of the FLOPs of a dense
    # (B, L) @ (L, C*D) GEMM over a mostly-zero matrix, which in fp32 missed the fast bf16 units
    recon_aux = torch.nn.functional.embedding_bag(idx_BK, cc.W_dec_LCD.reshape(L, C * D), mode="sum",
                                                  per_sample_weights=pre_BL.gather(-1, idx_BK).float())
    num = (resid - recon_aux).pow(2).sum(-1).mean()
    den = (resid - resid.mean(0)).pow(2).sum(-1).mean()
    return torch.nan_to_num(num / den, nan=0.0)


def compute_losses(cc: Crosscoder, x_BCD: Tensor, out: ForwardOutput, cfg: TrainConfig, step: int,
                   dead_L: Tensor | None) -> Losses:
    recon = out.recon_BCD.float()
    l2 = (recon - x_BCD).pow(2).sum(dim=(1, 2)).mean()
    zero = l2.new_zeros(())
    # one reduction over the batch serves the L1 term and dead-latent tracking: an elementwise
    # f * norms and its broadcast backward cost as much as a GEMM on the CPU
    # (a bf16 sum accumulates in fp32 on its own; sum(dtype=float32) would copy all of B x L first)
    f_L = out.latents_BL.sum(0).float()
    norms_L = cc.selection_norms() if out.norms_L is None else out.norms_L.float()  # the forward's
    match cc.cfg.activation:
        case "relu":
            l1 = (f_L * norms_L).sum() / x_BCD.shape[0]
            sparsity, aux = l1_coeff_at(step, cfg) * l1, zero
        case "jumprelu":  # aux: the pre-activation loss (constant lambda_P; lambda_S ramps)
            penalty = cc.jumprelu_penalty(out.latents_BL.float(), norms_L)
            aux = cc.jumprelu_preact_loss(out.pre_BL.float(), norms_L)
            sparsity = l1_coeff_at(step, cfg) * penalty + cc.cfg.jumprelu_preact_coeff * aux
        case "batchtopk":
            aux = aux_k_loss(cc, x_BCD, recon, out.pre_BL, dead_L, norms_L) if dead_L is not None else zero
            sparsity = cfg.auxk_alpha * aux
        case other:
            raise ValueError(f"unknown activation {other!r}")
    return Losses(l2 + sparsity, l2, sparsity, aux, f_L.detach())


def world_size() -> int:
    """Data-parallel workers in this training (1 without torch.distributed)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_firing(latent_sums_L: Tensor, n_tokens: int) -> tuple[Tensor, int]:
    """Latent sums and token count over every data-parallel worker, so dead latents are judged on the
    global batch (a worker's own window would grow with the worker count and revive fewer)."""
    if world_size() == 1:
        return latent_sums_L, n_tokens
    sums_L = latent_sums_L.clone()
    torch.distributed.all_reduce(sums_L)
    return sums_L, n_tokens * world_size()


def check_batch(x_BCD: Tensor, cc: Crosscoder, index: int) -> None:
    cc.check_input(x_BCD)
    if not torch.isfinite(x_BCD).all():
        bad = (~torch.isfinite(x_BCD)).flatten(1).any(1).nonzero()[:5, 0].tolist()
        raise NonFiniteBatchError(f"batch {index} contains NaN/Inf (rows {bad}...); "
                                  "training state unchanged")


# -- the trainer ----------------------------------------------------------------------------------

class Trainer:
    """Holds the crosscoder, optimizer, scheduler and counters; `fit` runs the loop."""

    def __init__(self, cc: Crosscoder, cfg: TrainConfig, device: str | torch.device | None = None):
        if cfg.crosscoder != cc.cfg:
            raise ValueError("TrainConfig.crosscoder differs from the crosscoder's own config")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cc, self.cfg = cc.to(self.device), cfg
        fused = cfg.fused_optimizer and self.device.type in ("cuda", "cpu")
        self.optimizer = torch.optim.Adam(cc.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                          fused=fused or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lambda s: lr_factor_at(s, cfg))
        self.dead = M.DeadLatents(cc.cfg.n_latents, max(1, cfg.dead_window_tokens), self.device)
        self.step = 0
        self.tokens = 0
        self.batches_consumed = 0
        self.bf16 = use_bf16(cfg, self.device)
        # what the forward pass goes through: the crosscoder, or a DDP wrapper of it (jobs/train.py)
        self.forward_module: torch.nn.Module = cc

    def _autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def train_step(self, x_BCD: Tensor) -> tuple[Losses, ForwardOutput]:
        cc, cfg = self.cc, self.cfg
        is_topk = cc.cfg.activation == "batchtopk"
        with self._autocast():
            out = self.forward_module(x_BCD, mode="train", k=k_at(self.step, cfg) if is_topk else None,
                                      sparse_decode=cfg.sparse_decode)
        dead_L = self.dead.mask() if is_topk else None
        losses = compute_losses(cc, x_BCD, out, cfg, self.step, dead_L)
        losses.loss.backward()
        torch.nn.utils.clip_grad_norm_(cc.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.dead.update(*global_firing(losses.latent_sums_L, x_BCD.shape[0]))
        if is_topk and self.step >= cc.cfg.threshold_start_step:
            cc.update_threshold(out.latents_BL, out.norms_L.detach())
        return losses, out

    def metrics(self, x_BCD: Tensor, losses: Losses, out: ForwardOutput) -> dict[str, float]:
        recon = out.recon_BCD.detach()
        fve, paper = M.fve(x_BCD, recon), M.fve_mean_of_ratios(x_BCD, recon)
        row = {"loss": losses.loss.item(), "l2": losses.l2.item(), "sparsity": losses.sparsity.item(),
               "aux": losses.aux.item(), "l0": M.l0(out.latents_BL).item(), "fve": fve.joint.item(),
               "fve_mean_of_ratios": paper.joint.item(), "dead": self.dead.count(),
               "lr": self.scheduler.get_last_lr()[0], "l1_coeff": l1_coeff_at(self.step, self.cfg)}
        for c, rev in enumerate(self.cc.cfg.revision_names()):
            row[store.column("fve", rev)] = fve.per_checkpoint_C[c].item()
            row[store.column("fve_mean_of_ratios", rev)] = paper.per_checkpoint_C[c].item()
        return row

    def fit(self, batches: Iterable[Tensor], log: Callable[[int, dict], None] | None = None,
            save: Callable[[Trainer], None] | None = None, progress: bool = True,
            report: Callable[[dict], None] | None = None, every_s: float | None = None) -> Trainer:
        """Train on raw activations until `n_steps` (or the batches run out).

        `batches` must start at `self.batches_consumed` (0 for a fresh run) for an exact resume.
        With `progress`, steps/s, tokens/s, loss, L0 and FVE show as a bar in a terminal or a log line
        every `every_s` (default `CROSSRAY_PROGRESS_SECONDS`, 30) otherwise, and go to `report` then.
        """
        fit_together({"": self}, batches, log=(lambda _, step, m: log(step, m)) if log else None,
                     save=(lambda: save(self)) if save else None, progress=progress, report=report,
                     every_s=every_s)
        return self

    def init_from_first_batch(self, x: Tensor) -> None:
        """JumpReLU's data-dependent b_enc (`jumprelu_init_firing`) from the first normalised batch;
        under data parallelism each worker saw its own batch, so they start from the mean."""
        firing = self.cc.cfg.jumprelu_init_firing
        if self.cc.cfg.activation != "jumprelu" or firing is None:
            return
        self.cc.init_jumprelu_bias(x, firing)
        if world_size() > 1:
            torch.distributed.all_reduce(self.cc.b_enc_L.data)
            self.cc.b_enc_L.data.div_(world_size())

    def step_batch(self, x: Tensor, log: Callable[[int, dict], None] | None = None,
                   save: Callable[[Trainer], None] | None = None) -> Tensor:
        """One step on a raw batch: check, normalise, update, then log/save on their cadence; returns
        the loss."""
        x = x.to(self.device, torch.float32, non_blocking=True)
        check_batch(x, self.cc, self.batches_consumed)
        x = self.cc.normalise(x)
        if self.batches_consumed == 0:
            self.init_from_first_batch(x)
        losses, out = self.train_step(x)
        self.step += 1
        self.batches_consumed += 1
        self.tokens += x.shape[0]
        last = self.step == self.cfg.n_steps
        if log and (self.step % self.cfg.metrics_every == 0 or last):
            log(self.step, self.metrics(x, losses, out))
        if save and (self.step % self.cfg.checkpoint_every == 0 or last):
            save(self)
        return losses.loss.detach()

    # -- persistence ------------------------------------------------------------------------------
    def save(self, folder: str | Path, meta: dict | None = None) -> Path:
        """Weights + config + full training state, atomically."""
        def write_state(tmp: Path) -> None:
            scalars = {"step": self.step, "tokens": self.tokens,
                       "batches_consumed": self.batches_consumed}
            store.write_train_state(tmp, self.optimizer, self.scheduler, scalars,
                                    {"tokens_since_fired_L": self.dead.tokens_since_fired_L})

        return store.save_crosscoder(self.cc, folder, self.cfg, meta, extra=write_state)

    @classmethod
    def resume(cls, folder: str | Path, cfg: TrainConfig | None = None,
               device: str | torch.device | None = None) -> Trainer:
        """A trainer in exactly the state `save` wrote (optimizer, schedule, RNG, counters)."""
        cc = store.load_crosscoder(folder)
        cfg = cfg or store.load_train_config(folder)
        if cfg is None:
            raise store.ArtifactError(f"{folder} holds no training config")
        trainer = cls(cc, cfg, device)
        scalars, tensors = store.read_train_state(folder, trainer.optimizer, trainer.scheduler)
        trainer.step, trainer.tokens = scalars["step"], scalars["tokens"]
        trainer.batches_consumed = scalars["batches_consumed"]
        trainer.dead.tokens_since_fired_L = tensors["tokens_since_fired_L"].to(trainer.device)
        return trainer


def fit_together(trainers: dict[str, Trainer], batches: Iterable[Tensor],
                 columns: dict[str, list[int]] | None = None,
                 log: Callable[[str, int, dict], None] | None = None, save: Callable[[], None] | None = None,
                 progress: bool = True, report: Callable[[dict], None] | None = None,
                 every_s: float | None = None, failed: dict[str, str] | None = None) -> dict[str, str]:
    """Train several crosscoders on one stream of batches, one step each per batch (a study's sets:
    `columns[name]` picks a set's checkpoints from the batch's axis), until `n_steps`, which they share
    with the batch size and checkpoint cadence; `save()` on that cadence saves them all.

    With more than one, a crosscoder whose batch columns hold NaN/Inf or whose loss is not finite is
    set aside in `failed` (name -> why; decided on every data-parallel rank alike) and the others go
    on; alone, a bad batch raises `NonFiniteBatchError` as `Trainer.step_batch` does."""
    from crossray.progress import Progress

    failed = {} if failed is None else failed
    lead = next(iter(trainers.values()))
    n_steps, every = lead.cfg.n_steps, lead.cfg.checkpoint_every
    together = len(trainers) > 1
    bar = Progress("train", n_steps, "steps", initial=lead.step, report=report, every_s=every_s) \
        if progress else None

    def logged(name: str, step: int, metrics: dict) -> None:
        if bar is not None and name == next((n for n in trainers if n not in failed), name):
            bar.set(loss=metrics["loss"], l0=metrics["l0"], fve=metrics["fve"])
        if log is not None:
            log(name, step, metrics)

    step, it = lead.step, iter(batches)
    while step < n_steps:
        x = next(it, None)
        if x is None:
            logger.warning("batches ran out at step %d of %d", step, n_steps)
            if save is not None and step % every:
                save()  # the final state, as a finished run has it
            break
        ok = {}
        for name, t in trainers.items():
            part = x if not columns or columns.get(name) is None else x[:, columns[name]]
            if name in failed:
                continue
            if together and not _agree(bool(torch.isfinite(part).all())):
                failed[name] = f"batch {t.batches_consumed} holds NaN/Inf in its checkpoints"
                logger.error("crosscoder %s set aside: %s; the others go on", name, failed[name])
                continue
            loss = t.step_batch(part, lambda s, m, name=name: logged(name, s, m))
            ok[name] = bool(torch.isfinite(loss))
        for name, finite in ok.items():
            if together and not _agree(finite):
                failed[name] = f"the loss is not finite at step {trainers[name].step}"
                logger.error("crosscoder %s set aside: %s; the others go on", name, failed[name])
        step += 1
        if bar is not None:
            bar.update(1, tokens=x.shape[0])
        if save is not None and (step % every == 0 or step == n_steps):
            save()
    if bar is not None:
        bar.close()
    return failed


SHARED_SETTINGS = ("batch_size", "n_steps", "data_seed", "shuffle_buffer_rows", "checkpoint_every")
"""Training settings that crosscoders trained together on one stream share."""


def check_shared(settings: dict[str, TrainSettings]) -> None:
    """Refuse crosscoders that cannot train together: they must share `SHARED_SETTINGS`."""
    lead = next(iter(settings.values()))
    for name, s in settings.items():
        differ = [f for f in SHARED_SETTINGS if getattr(s, f) != getattr(lead, f)]
        if differ:
            raise ValueError(f"{name} differs in train.{', train.'.join(differ)}: crosscoders trained "
                             f"together on one stream share {', '.join(SHARED_SETTINGS)}")


def _agree(value: bool) -> bool:
    """`value` and'ed over the data-parallel ranks (every rank decides alike)."""
    if world_size() == 1:
        return value
    flag = torch.tensor([1.0 if value else 0.0])
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item() > 0)


@torch.no_grad()
def estimate_norm_factors(batches: Iterable[Tensor], n_batches: int) -> Tensor:
    """The normalisation factors (C,) from the first `n_batches` batches (B, C, D) of raw rows."""
    total, count, d_model = None, 0, 0
    for x_BCD in itertools.islice(batches, n_batches):
        norms_C = x_BCD.float().norm(dim=-1).sum(0)
        total = norms_C if total is None else total + norms_C
        count, d_model = count + x_BCD.shape[0], x_BCD.shape[-1]
    if total is None:
        raise ValueError("no batches to estimate normalisation factors from")
    return torch.tensor(norm_factors(total.tolist(), count, d_model))
