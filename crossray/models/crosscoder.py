"""The N-way acausal crosscoder (Crosscoding Through Time, method.md §4; Lindsey et al. 2024).

Dimension legend: B batch, C checkpoints, D d_model, L latents.

One shared latent vector per token position, read from every checkpoint and written back to each:
    pre_BL   = sum_c x_BCD[:, c] @ W_enc_CDL[c] + b_enc_L           (one GEMM over flattened C*D)
    latents  = act(pre)                                             (relu | batchtopk | jumprelu)
    recon_BCD[:, c] = latents_BL @ W_dec_LCD[:, c] + b_dec_CD[c]    (one GEMM over flattened C*D)

Inputs are *normalised* activations x~ = s_c * x (s_c in `norm_factors_C`, estimated once on training
data, method.md §3.4). `fold()` returns a crosscoder that maps raw activations to raw reconstructions
exactly; it keeps BatchTopK/JumpReLU selection identical by carrying the factors in
`dec_norm_scale_C`, so the decoder norms used for selection are the unfolded ones (method.md §16.3).

BatchTopK state (the eval threshold) never changes inside `forward`: the training loop updates it
explicitly (`update_threshold`), and `mode` is an argument, not `nn.Module.training` (§16.2).
"""

from __future__ import annotations

import logging
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crossray.config import CrosscoderConfig

logger = logging.getLogger(__name__)

Mode = Literal["train", "eval"]


def norm_factors(norm_sum_C, count: int, d_model: int) -> list[float]:
    """s_c = sqrt(D) / mean ||x_c|| from the sum of norms over `count` rows (method.md §3.4)."""
    if count == 0:
        raise ValueError("no rows to estimate normalisation factors from")
    return [d_model**0.5 / (float(v) / count) for v in norm_sum_C]


class ForwardOutput(NamedTuple):
    recon_BCD: Tensor
    latents_BL: Tensor
    pre_BL: Tensor
    """Pre-activations (after ReLU for batchtopk, raw for jumprelu/relu)."""
    norms_L: Tensor | None = None
    """`selection_norms()` as this pass computed them (with their gradient), for the losses and the
    threshold to reuse: one pass over the decoder per step, not one per use. None in eval mode when
    selection does not need them."""


def batch_topk_mask(scaled_BL: Tensor, n_active: int) -> Tensor:
    """The batch's `n_active` largest entries as a boolean mask (`batch_topk_indices`)."""
    return _mask(batch_topk_indices(scaled_BL, n_active), scaled_BL)


def _mask(win: Tensor, like_BL: Tensor) -> Tensor:
    return torch.zeros(like_BL.numel(), dtype=torch.bool, device=like_BL.device).index_fill_(
        0, win, True).view_as(like_BL)


def batch_topk_indices(scaled_BL: Tensor, n_active: int) -> Tensor:
    """The batch's `n_active` largest entries as flat indices into B x L, in no particular order: the
    same set as a top-k over the whole flattened batch (ties at the boundary aside), at the cost of
    about one pass over it.

    1. Each row offers its top `m` (twice the mean number of winners per row) as candidates; the
       `n_active` largest candidates win, and t is the smallest winner.
    2. A row whose smallest candidate is above t may hold winners beyond its candidates (BatchTopK
       gives some tokens many latents): such rows offer every entry instead, and step 1 is repeated on
       the larger pool (its threshold can only rise).
    3. Now every entry left out is at most t <= every winner: a top-k of the batch (entries equal to t
       tie, as in any top-k; bf16 scores tie often). When many rows are full, the full top-k it is.
    """
    B, L = scaled_BL.shape
    K = min(n_active, B * L)
    m = min(L, 2 * -(-K // B))
    if m == L:
        return _flat_topk_indices(scaled_BL, K)
    vals_Bm, idx_Bm = scaled_BL.topk(m, dim=1, sorted=False)
    top = vals_Bm.flatten().topk(K, sorted=False)
    full_B = vals_Bm.min(1).values > top.values.min()
    n_full = int(full_B.sum())
    if n_full == 0:
        return top.indices // m * L + idx_Bm.flatten()[top.indices]
    if n_full > B // 8:  # the pool would be a large part of the batch: no saving left
        return _flat_topk_indices(scaled_BL, K)
    part_B, rows_B = ~full_B, torch.arange(B, device=scaled_BL.device)
    vals = torch.cat([vals_Bm[part_B].flatten(), scaled_BL[full_B].flatten()])
    rows = torch.cat([rows_B[part_B].repeat_interleave(m), rows_B[full_B].repeat_interleave(L)])
    cols = torch.cat([idx_Bm[part_B].flatten(), torch.arange(L, device=scaled_BL.device).repeat(n_full)])
    win = vals.topk(K, sorted=False).indices
    return rows[win] * L + cols[win]


def _flat_topk_indices(scaled_BL: Tensor, K: int) -> Tensor:
    return scaled_BL.flatten().topk(K, sorted=False).indices


class _JumpReLU(torch.autograd.Function):
    """f = x * H(x - theta) with the step's straight-through gradient, a rectangle kernel K of width
    epsilon: df/dtheta = -(theta / epsilon) K (Rajamanoharan et al. 2024) and, with `ste_input`,
    df/dx = H + (x / epsilon) K (Anthropic, January 2025: the jump's gradient reaches the encoder)."""

    @staticmethod
    def forward(ctx, x, theta, bandwidth, ste_input):
        ctx.save_for_backward(x, theta)
        ctx.bandwidth, ctx.ste_input = bandwidth, ste_input
        return x * (x > theta)

    @staticmethod
    def backward(ctx, grad):
        x, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        in_window = ((x - theta).abs() < eps / 2).to(grad.dtype)
        grad_theta = -(theta / eps) * in_window * grad
        grad_x = grad * (x > theta)
        if ctx.ste_input:
            grad_x = grad_x + grad * in_window * x / eps
        return grad_x, grad_theta.sum(0), None, None


class Crosscoder(nn.Module):
    def __init__(self, cfg: CrosscoderConfig):
        super().__init__()
        self.cfg = cfg
        C, D, L = cfg.n_checkpoints, cfg.d_model, cfg.n_latents
        gen = torch.Generator().manual_seed(cfg.seed)
        W_dec_LCD = torch.randn(L, C, D, generator=gen)
        W_dec_LCD *= cfg.dec_init_norm / W_dec_LCD.norm(dim=-1, keepdim=True)
        self.W_dec_LCD = nn.Parameter(W_dec_LCD)
        # transpose init; contiguous, or optimizer states restored from disk get other strides
        self.W_enc_CDL = nn.Parameter(W_dec_LCD.permute(1, 2, 0).contiguous())
        self.b_enc_L = nn.Parameter(torch.zeros(L))
        self.b_dec_CD = nn.Parameter(torch.zeros(C, D))
        self.register_buffer("norm_factors_C", torch.ones(C))
        self.register_buffer("dec_norm_scale_C", torch.ones(C))
        if cfg.activation == "batchtopk":
            self.register_buffer("threshold", torch.tensor(-1.0))
        if cfg.activation == "jumprelu":
            self.log_threshold_L = nn.Parameter(torch.full((L,), float(cfg.jumprelu_init_threshold)).log())

    # -- shapes and helpers -----------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return self.cfg.n_checkpoints, self.cfg.d_model, self.cfg.n_latents

    def check_input(self, x_BCD: Tensor) -> None:
        C, D, _ = self.shape
        if x_BCD.ndim != 3 or x_BCD.shape[1:] != (C, D):
            raise ValueError(f"expected activations of shape (B, C={C}, D={D}), got {tuple(x_BCD.shape)}")

    def decoder_norms(self) -> Tensor:
        """||W_dec[i, c]|| in the unfolded (normalised) space, shape (L, C)."""
        return self.W_dec_LCD.norm(dim=-1) * self.dec_norm_scale_C

    def selection_norms(self) -> Tensor:
        """Sum over checkpoints of decoder norms, shape (L,): the weight of L1 and of top-k selection."""
        return self.decoder_norms().sum(-1)

    # -- encode / decode --------------------------------------------------------------------------
    def pre_acts(self, x_BCD: Tensor) -> Tensor:
        B = x_BCD.shape[0]
        C, D, L = self.shape
        W = self.W_enc_CDL.reshape(C * D, L)
        return torch.addmm(self.b_enc_L.to(x_BCD.dtype), x_BCD.reshape(B, C * D), W.to(x_BCD.dtype))

    def encode(self, x_BCD: Tensor, mode: Mode = "eval", k: int | None = None) -> Tensor:
        return self._activate(self.pre_acts(x_BCD), mode, k)[0]

    def _activate(self, pre_BL: Tensor, mode: Mode, k: int | None, norms_L: Tensor | None = None
                  ) -> tuple[Tensor, Tensor]:
        match self.cfg.activation:
            case "relu":
                latents = F.relu(pre_BL)
                return latents, pre_BL
            case "batchtopk":
                pre_BL = F.relu(pre_BL)
                norms_L = self.selection_norms() if norms_L is None else norms_L
                if mode == "train":
                    mask_BL = _mask(self._winners(pre_BL, norms_L, k), pre_BL)
                    return pre_BL.where(mask_BL, 0.0), pre_BL  # (a bool x bf16 mul would cast the mask)
                scaled = pre_BL * norms_L
                if self.threshold < 0:
                    raise ValueError("BatchTopK eval threshold is not set (train the model first)")
                return pre_BL * (scaled > self.threshold), pre_BL
            case "jumprelu":
                theta = self.log_threshold_L.exp()
                return _JumpReLU.apply(pre_BL, theta.to(pre_BL.dtype), self.cfg.jumprelu_bandwidth,
                                       self.cfg.jumprelu_ste_input), pre_BL
            case other:
                raise ValueError(f"unknown activation {other!r}")

    def decode(self, latents_BL: Tensor) -> Tensor:
        B = latents_BL.shape[0]
        C, D, L = self.shape
        W = self.W_dec_LCD.reshape(L, C * D).to(latents_BL.dtype)
        out = torch.addmm(self.b_dec_CD.reshape(C * D).to(latents_BL.dtype), latents_BL, W)
        return out.view(B, C, D)

    def decode_sparse(self, latents_BL: Tensor) -> Tensor:
        """Same as `decode`, touching only active latents (embedding_bag, with its backward)."""
        rows, cols = latents_BL.nonzero(as_tuple=True)  # row-major: rows are sorted
        return self._decode_entries(rows, cols, latents_BL[rows, cols], latents_BL.shape[0])

    def _decode_entries(self, rows: Tensor, cols: Tensor, weights: Tensor, B: int) -> Tensor:
        """The decode of B rows given their nonzero latents as (row, column, value), rows sorted."""
        C, D, L = self.shape
        offsets = torch.searchsorted(rows, torch.arange(B, device=rows.device))
        W = self.W_dec_LCD.reshape(L, C * D)
        out = F.embedding_bag(cols, W.to(weights.dtype), offsets, mode="sum", per_sample_weights=weights)
        return (out + self.b_dec_CD.reshape(C * D).to(out.dtype)).view(B, C, D)

    @torch.no_grad()
    def _winners(self, relu_BL: Tensor, norms_L: Tensor, k: int | None) -> Tensor:
        """Flat indices of the batch's k * B largest scores relu(pre) * decoder norm. The scores only
        choose: no graph, and in the GEMM's dtype (a bf16 x fp32 product would copy B x L to fp32)."""
        return batch_topk_indices(relu_BL * norms_L.to(relu_BL.dtype), (k or self.cfg.k) * relu_BL.shape[0])

    def _train_batchtopk_sparse(self, pre_BL: Tensor, k: int | None, norms_L: Tensor) -> ForwardOutput:
        """BatchTopK training with the decode fed straight from the selection: the gradient reaches
        the encoder through the B*k winners alone (ReLU, gather and their backward on B*k entries,
        not B x L), and the dense latents are built for the record only (no graph)."""
        B, L = pre_BL.shape
        relu_BL = F.relu(pre_BL)  # for aux-k and the metrics; in the backward only when aux-k is used
        win = self._winners(relu_BL, norms_L, k).sort().values
        weights = F.relu(pre_BL.view(-1)[win])
        latents_BL = torch.zeros_like(relu_BL).view(-1).index_copy_(0, win, weights.detach()).view(B, L)
        return ForwardOutput(self._decode_entries(win // L, win % L, weights, B), latents_BL, relu_BL,
                             norms_L)

    def forward(self, x_BCD: Tensor, mode: Mode = "eval", k: int | None = None,
                sparse_decode: bool = False) -> ForwardOutput:
        """Reconstruction, latents and pre-activations. With `sparse_decode` (BatchTopK only) the
        decode touches only active latents; in training the latents then carry no graph (the
        reconstruction and the pre-activations do)."""
        self.check_input(x_BCD)
        needed = mode == "train" or self.cfg.activation == "batchtopk"
        norms_L = self.selection_norms() if needed else None
        use_sparse = sparse_decode and self.cfg.activation == "batchtopk"
        if use_sparse and mode == "train":
            return self._train_batchtopk_sparse(self.pre_acts(x_BCD), k, norms_L)
        latents, pre = self._activate(self.pre_acts(x_BCD), mode, k, norms_L)
        recon = self.decode_sparse(latents) if use_sparse else self.decode(latents)
        return ForwardOutput(recon, latents, pre, norms_L)

    # -- raw activations --------------------------------------------------------------------------
    def normalise(self, x_BCD: Tensor) -> Tensor:
        return x_BCD * self.norm_factors_C[:, None].to(x_BCD.dtype)

    @torch.no_grad()
    def fold(self) -> Crosscoder:
        """A copy that maps raw activations to raw reconstructions (method.md §3.5)."""
        s_C = self.norm_factors_C
        folded = Crosscoder(self.cfg)
        folded.load_state_dict(self.state_dict())
        folded.W_enc_CDL.mul_(s_C[:, None, None])
        folded.W_dec_LCD.div_(s_C[None, :, None])
        folded.b_dec_CD.div_(s_C[:, None])
        folded.dec_norm_scale_C.mul_(s_C)  # selection still sees the unfolded decoder norms
        folded.norm_factors_C.fill_(1.0)
        return folded

    # -- BatchTopK threshold (explicit, training only) ---------------------------------------------
    @torch.no_grad()
    def update_threshold(self, latents_BL: Tensor, norms_L: Tensor | None = None) -> None:
        """EMA of the smallest positive scaled activation in the batch (method.md §5.3)."""
        scaled = latents_BL.float() * (self.selection_norms() if norms_L is None else norms_L.float())
        positive = scaled[scaled > 0]
        if positive.numel() == 0:
            return
        m = positive.min()
        if self.threshold < 0:
            self.threshold.copy_(m)
        else:
            beta = self.cfg.threshold_beta
            self.threshold.mul_(beta).add_((1 - beta) * m)

    def jumprelu_penalty(self, latents_BL: Tensor, norms_L: Tensor | None = None) -> Tensor:
        """JumpReLU sparsity: mean_b sum_i tanh(c * f_i * sum_c ||W_dec[i, c]||), a smooth L0.

        Unlike a pure straight-through L0, it gives the encoder and decoder a gradient towards
        sparsity, and the thresholds still learn through the jump's straight-through gradient
        (Anthropic's crosscoder update, Jan 2025); c = `jumprelu_tanh_scale`.
        """
        norms_L = self.selection_norms() if norms_L is None else norms_L
        return torch.tanh(self.cfg.jumprelu_tanh_scale * latents_BL * norms_L).sum(-1).mean()

    def jumprelu_preact_loss(self, pre_BL: Tensor, norms_L: Tensor | None = None) -> Tensor:
        """mean_b sum_i ReLU(theta_i - h_i) * sum_c ||W_dec[i, c]||: a latent below its threshold is
        pulled up (and its threshold down), so latents that never fire get a gradient (Anthropic,
        January 2025)."""
        norms_L = self.selection_norms() if norms_L is None else norms_L
        return (F.relu(self.log_threshold_L.exp() - pre_BL) * norms_L).sum(-1).mean()

    @torch.no_grad()
    def init_jumprelu_bias(self, x_BCD: Tensor, firing: float) -> None:
        """b_enc so that each latent fires on a `firing` share of this batch's tokens: theta minus
        the (1 - firing) quantile of its pre-activations without bias (Anthropic's data-dependent
        init)."""
        pre_BL = self.pre_acts(x_BCD.float()) - self.b_enc_L
        self.b_enc_L.copy_(self.log_threshold_L.exp() - pre_BL.quantile(1 - firing, dim=0))
