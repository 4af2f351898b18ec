"""Crosscoder evaluation metrics (method.md §7), per checkpoint.

- FVE as a ratio of sums, `1 - sum ||x - x^||^2 / sum ||x - mean||^2` (the standard definition), and
  the paper's mean of per-token ratios as a separately named metric (`fve_mean_of_ratios`, §7.1).
- L0 and dead latents over a window of tokens.
- ΔCE and CE-recovered with the reconstruction spliced into each checkpoint's forward pass (§7.3),
  optionally leaving position 0 alone (§16.7).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from crossray.models.crosscoder import Crosscoder
from crossray.models.layer import LayerModel
from crossray.store import column


class FVE(NamedTuple):
    per_checkpoint_C: Tensor
    joint: Tensor


def fve(x_BCD: Tensor, recon_BCD: Tensor) -> FVE:
    """Fraction of variance explained, ratio of sums over the batch (mean taken over the batch)."""
    x, r = x_BCD.float(), recon_BCD.float()
    err_C = (x - r).pow(2).sum(dim=(0, 2))
    var_C = (x - x.mean(0, keepdim=True)).pow(2).sum(dim=(0, 2))
    return FVE(1 - err_C / var_C, 1 - err_C.sum() / var_C.sum())


def fve_mean_of_ratios(x_BCD: Tensor, recon_BCD: Tensor) -> FVE:
    """The paper's explained variance: mean over tokens of per-token ratios (method.md §7.1)."""
    x, r = x_BCD.float(), recon_BCD.float()
    err_BC = (x - r).pow(2).sum(-1)
    var_BC = (x - x.mean(0, keepdim=True)).pow(2).sum(-1)
    return FVE((1 - err_BC / var_BC).mean(0), (1 - err_BC.sum(1) / var_BC.sum(1)).mean())


def l0(latents_BL: Tensor) -> Tensor:
    return (latents_BL > 0).float().sum(-1).mean()


class DeadLatents:
    """Tokens since each latent last fired; dead when that reaches `window_tokens`."""

    def __init__(self, n_latents: int, window_tokens: int, device: torch.device | str = "cpu"):
        self.window = window_tokens
        self.tokens_since_fired_L = torch.zeros(n_latents, dtype=torch.long, device=device)

    def update(self, latent_sums_L: Tensor, n_tokens: int) -> None:
        """Count `n_tokens` more; latents whose batch sum is positive fired (latents are >= 0)."""
        self.tokens_since_fired_L += n_tokens
        self.tokens_since_fired_L.masked_fill_(latent_sums_L > 0, 0)

    def mask(self) -> Tensor:
        return self.tokens_since_fired_L >= self.window

    def count(self) -> int:
        return int(self.mask().sum())


@torch.no_grad()
def evaluate(crosscoder: Crosscoder, acts: Tensor | Iterable[Tensor], batch_size: int = 4096
             ) -> dict[str, float]:
    """FVE (both ways), L2 loss, L0 and never-active latents over raw activation rows (N, C, D), given
    at once or as an iterable of row blocks (so held-out activations need not fit in memory).

    The standard FVE is a ratio of sums over all rows; the paper's mean of ratios is taken per batch
    of `batch_size` rows (with that batch's mean) and averaged over batches, like its evaluation.
    """
    C, D = crosscoder.cfg.n_checkpoints, crosscoder.cfg.d_model
    dev = crosscoder.norm_factors_C.device  # rows go where the crosscoder is
    err_C = torch.zeros(C, dtype=torch.float64, device=dev)
    sum_CD = torch.zeros(C, D, dtype=torch.float64, device=dev)
    sq_C = torch.zeros(C, dtype=torch.float64, device=dev)
    paper, l0s, fired = [], [], torch.zeros(crosscoder.cfg.n_latents, dtype=torch.bool, device=dev)
    n = 0
    blocks = [acts] if isinstance(acts, Tensor) else acts
    for x in (b for block in blocks for b in block.split(batch_size)):
        n += len(x)
        x = crosscoder.normalise(x.to(dev).float())
        out = crosscoder(x, mode="eval")
        err_C += (x - out.recon_BCD).pow(2).sum(dim=(0, 2)).double()
        sum_CD += x.sum(0).double()
        sq_C += x.pow(2).sum(dim=(0, 2)).double()
        paper.append(fve_mean_of_ratios(x, out.recon_BCD).per_checkpoint_C)
        l0s.append(l0(out.latents_BL) * len(x))
        fired |= (out.latents_BL > 0).any(0)
    var_C = sq_C - sum_CD.pow(2).sum(-1) / n
    fve_C = 1 - err_C / var_C
    paper_C = torch.stack(paper).mean(0)
    row = {"fve": float(1 - err_C.sum() / var_C.sum()), "l2": float(err_C.sum() / n),
           "l0": float(sum(l0s) / n), "dead": int((~fired).sum())}
    for c, rev in enumerate(crosscoder.cfg.revision_names()):
        row[column("fve", rev)] = float(fve_C[c])
        row[column("fve_mean_of_ratios", rev)] = float(paper_C[c])
    return row


# -- CE with the reconstruction spliced in ---------------------------------------------------------

class CEResult(NamedTuple):
    ce_clean_C: Tensor
    ce_spliced_C: Tensor
    ce_zero_C: Tensor

    @property
    def delta_ce_C(self) -> Tensor:
        """The paper's ΔCE: spliced minus clean, nats."""
        return self.ce_spliced_C - self.ce_clean_C

    @property
    def ce_recovered_C(self) -> Tensor:
        return 1 - self.delta_ce_C / (self.ce_zero_C - self.ce_clean_C)


def _ce_with(lm: LayerModel, input_ids: Tensor, replacement: Tensor | None) -> Tensor:
    """Mean next-token CE of the full model, block `lm.layer`'s input replaced when given."""
    def swap(_module, args, kwargs):
        if args:
            return (replacement.to(args[0].dtype), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": replacement.to(kwargs["hidden_states"].dtype)}

    handle = lm.blocks[lm.layer].register_forward_pre_hook(swap, with_kwargs=True) \
        if replacement is not None else None
    try:
        logits = lm.model(input_ids=input_ids, use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


@torch.no_grad()
def spliced_ce(crosscoder: Crosscoder, models: Sequence[LayerModel], input_ids: Tensor,
               skip_first_position: bool = True) -> CEResult:
    """CE clean / with the crosscoder reconstruction spliced in / with the layer zeroed, per checkpoint.

    The reconstruction uses the activations of all checkpoints at once (the latent is shared). With
    `skip_first_position` position 0 keeps its real activation in the spliced *and* the zeroed pass
    (training never saw it, §16.7), so both ends of CE recovered follow one position-0 policy.
    """
    return spliced_ce_policies(crosscoder, models, input_ids, (skip_first_position,))[0]


@torch.no_grad()
def spliced_ce_policies(crosscoder: Crosscoder, models: Sequence[LayerModel], input_ids: Tensor,
                        policies: Sequence[bool] = (True, False), batch_sequences: int | None = None
                        ) -> list[CEResult]:
    """`spliced_ce` for several position-0 policies (skip first position or not), sharing the
    activations, the reconstruction and the clean pass; `batch_sequences` at a time (the CEs of equal-
    length sequences average over batches), so 240 x 1024 tokens never run as one batch."""
    if batch_sequences and len(input_ids) > batch_sequences:
        chunks = input_ids.split(batch_sequences)
        parts = [spliced_ce_policies(crosscoder, models, chunk, policies) for chunk in chunks]
        w = torch.tensor([len(c) for c in chunks], dtype=torch.float32) / len(input_ids)

        def mean(k: int, field: str) -> Tensor:
            return sum(wi * getattr(part[k], field) for wi, part in zip(w, parts, strict=True))

        return [CEResult(*(mean(k, f) for f in CEResult._fields)) for k in range(len(policies))]
    if len(models) != crosscoder.cfg.n_checkpoints:
        raise ValueError(f"{len(models)} models for a crosscoder over {crosscoder.cfg.n_checkpoints}")
    input_ids = input_ids.to(crosscoder.norm_factors_C.device)  # the models' and crosscoder's device
    acts_CBSD = torch.stack([m.resid_pre(input_ids) for m in models])
    C, B, S, D = acts_CBSD.shape
    x_NCD = acts_CBSD.permute(1, 2, 0, 3).reshape(B * S, C, D)  # (B*S, C, D)
    recon_NCD = crosscoder(crosscoder.normalise(x_NCD)).recon_BCD / crosscoder.norm_factors_C[:, None]
    recon_CBSD = recon_NCD.view(B, S, C, D).permute(2, 0, 1, 3)  # (C, B, S, D)
    clean = torch.stack([_ce_with(lm, input_ids, None) for lm in models])
    out = []
    for skip in policies:
        spliced_CBSD, zero_CBSD = recon_CBSD.clone(), torch.zeros_like(acts_CBSD)
        if skip:
            spliced_CBSD[:, :, 0] = zero_CBSD[:, :, 0] = acts_CBSD[:, :, 0]
        spliced = torch.stack([_ce_with(lm, input_ids, spliced_CBSD[c]) for c, lm in enumerate(models)])
        zero = torch.stack([_ce_with(lm, input_ids, zero_CBSD[c]) for c, lm in enumerate(models)])
        out.append(CEResult(clean, spliced, zero))
    return out
