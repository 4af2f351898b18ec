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


class _JumpReLU(torch.autograd.Function):
    """f = x * H(x - theta); straight-through rectangle-kernel gradient for theta (Rajamanoharan+ 2024)."""

    @staticmethod
    def forward(ctx, x, theta, bandwidth):
        ctx.save_for_backward(x, theta)
        ctx.bandwidth = bandwidth
        return x * (x > theta)

    @staticmethod
    def backward(ctx, grad):
        x, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        in_window = ((x - theta).abs() < eps / 2).to(grad.dtype)
        grad_theta = -(theta / eps) * in_window * grad
        return grad * (x > theta), grad_theta.sum(0), None


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

    def _activate(self, pre_BL: Tensor, mode: Mode, k: int | None) -> tuple[Tensor, Tensor]:
        match self.cfg.activation:
            case "relu":
                latents = F.relu(pre_BL)
                return latents, pre_BL
            case "batchtopk":
                pre_BL = F.relu(pre_BL)
                scaled = pre_BL * self.selection_norms()
                if mode == "train":
                    k = k or self.cfg.k
                    flat = scaled.flatten()
                    idx = flat.topk(min(k * pre_BL.shape[0], flat.numel()), sorted=False).indices
                    mask = torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, idx, True)
                    return pre_BL * mask.view_as(pre_BL), pre_BL
                if self.threshold < 0:
                    raise ValueError("BatchTopK eval threshold is not set (train the model first)")
                return pre_BL * (scaled > self.threshold), pre_BL
            case "jumprelu":
                theta = self.log_threshold_L.exp()
                return _JumpReLU.apply(pre_BL, theta.to(pre_BL.dtype), self.cfg.jumprelu_bandwidth), pre_BL
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
        B = latents_BL.shape[0]
        C, D, L = self.shape
        rows, cols = latents_BL.nonzero(as_tuple=True)  # row-major: rows are sorted
        weights = latents_BL[rows, cols]
        offsets = torch.searchsorted(rows, torch.arange(B, device=rows.device))
        W = self.W_dec_LCD.reshape(L, C * D)
        out = F.embedding_bag(cols, W.to(weights.dtype), offsets, mode="sum", per_sample_weights=weights)
        return (out + self.b_dec_CD.reshape(C * D).to(out.dtype)).view(B, C, D)

    def forward(self, x_BCD: Tensor, mode: Mode = "eval", k: int | None = None,
                sparse_decode: bool = False) -> ForwardOutput:
        self.check_input(x_BCD)
        latents, pre = self._activate(self.pre_acts(x_BCD), mode, k)
        use_sparse = sparse_decode and self.cfg.activation == "batchtopk"
        recon = self.decode_sparse(latents) if use_sparse else self.decode(latents)
        return ForwardOutput(recon, latents, pre)

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
    def update_threshold(self, latents_BL: Tensor) -> None:
        """EMA of the smallest positive scaled activation in the batch (method.md §5.3)."""
        scaled = latents_BL.float() * self.selection_norms()
        positive = scaled[scaled > 0]
        if positive.numel() == 0:
            return
        m = positive.min()
        if self.threshold < 0:
            self.threshold.copy_(m)
        else:
            beta = self.cfg.threshold_beta
            self.threshold.mul_(beta).add_((1 - beta) * m)

    def jumprelu_penalty(self, latents_BL: Tensor) -> Tensor:
        """JumpReLU sparsity: mean_b sum_i tanh(c * f_i * sum_c ||W_dec[i, c]||), a smooth L0.

        Unlike a pure straight-through L0, it gives the encoder and decoder a gradient towards
        sparsity, and the thresholds still learn through the jump's straight-through gradient
        (Anthropic's crosscoder update, Jan 2025). NOTE: c sets where the penalty saturates; with
        inputs normalised to norm sqrt(D) per checkpoint, c = 4 saturates for every active feature
        (an L0 with no gradient left, L0 stays ~4x too high on planted data); c = 1 keeps the
        gradient in the range features live in and recovers the planted L0 (tests/test_train.py).
        """
        return torch.tanh(self.cfg.jumprelu_tanh_scale * latents_BL * self.selection_norms()).sum(-1).mean()
