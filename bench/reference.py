"""Paper-style reference implementations (the computation pattern of the authors' trainer.py and
crosscoder.py, re-written here; not their code): einsum encode/decode in fp32, per-model metrics
with `.item()` every step, default (foreach) Adam, BatchTopK with a dense decode."""

from __future__ import annotations

import torch


class PaperCrosscoder(torch.nn.Module):
    def __init__(self, W_enc, W_dec, b_enc, b_dec):
        super().__init__()
        self.W_enc = torch.nn.Parameter(W_enc.clone())  # (n, d, H)
        self.W_dec = torch.nn.Parameter(W_dec.clone())  # (H, n, d)
        self.b_enc = torch.nn.Parameter(b_enc.clone())
        self.b_dec = torch.nn.Parameter(b_dec.clone())

    def pre(self, x):
        return torch.einsum("bnd,ndh->bh", x, self.W_enc) + self.b_enc

    def decode(self, f):
        return torch.einsum("bh,hnd->bnd", f, self.W_dec) + self.b_dec

    def dec_norm_sum(self):
        return self.W_dec.norm(dim=-1).sum(-1)


def paper_l1_losses(cc: PaperCrosscoder, x, l1_coeff: float):
    f = torch.relu(cc.pre(x))
    recon = cc.decode(f)
    e = recon - x
    l2 = e.pow(2).sum(-1).sum(-1).mean()
    l1 = (f * cc.dec_norm_sum()[None]).sum(-1).mean()
    return l2 + l1_coeff * l1, recon, f


def paper_batchtopk_losses(cc: PaperCrosscoder, x, k: int):
    p = torch.relu(cc.pre(x))
    scaled = p * cc.dec_norm_sum()[None]
    flat = scaled.flatten()
    idx = flat.topk(k * x.shape[0], sorted=False).indices
    mask = torch.zeros_like(flat).scatter(0, idx, 1.0).view_as(p)
    f = p * mask
    recon = cc.decode(f)
    return (recon - x).pow(2).sum(-1).sum(-1).mean(), recon, f


def paper_metrics(x, recon, f) -> dict:
    """Per-model metrics with a host sync per value, every step (trainer.py:get_losses)."""
    out = {"l0": (f > 0).float().sum(-1).mean().item()}
    mu = x.mean(0, keepdim=True)
    for m in range(x.shape[1]):
        e = (x[:, m] - recon[:, m]).pow(2).sum(-1)
        v = (x[:, m] - mu[:, m]).pow(2).sum(-1)
        out[f"ev_{m}"] = (1 - e / v).mean().item()
        out[f"l2_{m}"] = e.mean().item()
    return out


def paper_step(cc, opt, sched, x, loss_fn):
    loss, recon, f = loss_fn(cc, x)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(cc.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad()
    return {"loss": loss.item(), **paper_metrics(x, recon.detach(), f.detach())}


def paper_ie(cc_folded, models, ids, mask, clean, patch, steps: int, ms):
    """IE the way the authors' attribution.py computes it (method.md §11.3-11.4): a full forward of
    every checkpoint to capture the layer, then one full forward per alpha with the reconstruction
    plus error spliced in at every position, gradients w.r.t. the latent and error leaves, parameters
    not frozen, logits at every position. Returns {m: per-token (ie_BSL, err_BS)} for m in `ms`."""
    import torch

    from crossray.models.layer import model_inputs

    xs = []
    for lm in models:
        with torch.no_grad():
            hs = lm.model(**model_inputs(lm.model, ids, mask), output_hidden_states=True).hidden_states
        xs.append(hs[lm.layer].float())
    x_CBSD = torch.stack(xs)
    C, B, S, D = x_CBSD.shape
    with torch.no_grad():
        out = cc_folded(x_CBSD.permute(1, 2, 0, 3).reshape(B * S, C, D), mode="eval")
    return {m: _paper_ig_one(cc_folded, models[m], x_CBSD[m], out, m, ids, mask, clean, patch, steps)
            for m in ms}


def _paper_ig_one(cc_folded, lm, x_BSD, out, m, ids, mask, clean, patch, steps):
    import torch

    from crossray.models.layer import model_inputs

    B, S, D = x_BSD.shape
    C = out.recon_BCD.shape[1]
    f = out.latents_BL  # (B*S, L)
    err = x_BSD - out.recon_BCD.view(B, S, C, D)[:, :, m]
    lm.model.requires_grad_(True)
    grad_f, grad_e = torch.zeros_like(f), torch.zeros_like(err)
    try:
        for k in range(steps):
            scale = 1 - k / steps
            f_k = (scale * f).requires_grad_(True)
            e_k = (scale * err).requires_grad_(True)
            x_k = (f_k @ cc_folded.W_dec_LCD[:, m] + cc_folded.b_dec_CD[m]).view(B, S, D) + e_k

            def swap(_mod, args, kwargs, x_k=x_k):
                if args:
                    return (x_k, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": x_k}

            h = lm.blocks[lm.layer].register_forward_pre_hook(swap, with_kwargs=True)
            try:
                logits = lm.model(**model_inputs(lm.model, ids, mask)).logits  # every position
            finally:
                h.remove()
            rows = torch.arange(B)
            metric = logits[rows, -1, patch] - logits[rows, -1, clean]
            gf, ge = torch.autograd.grad(metric.sum(), (f_k, e_k))
            grad_f += gf / steps
            grad_e += ge / steps
    finally:
        lm.model.requires_grad_(False)
    real = mask.bool()
    ie = (grad_f * -f).view(B, S, -1) * real[..., None]
    return ie.detach(), (grad_e * -err).sum(-1).detach() * real
