"""B4: IE by integrated gradients (10 steps), examples/s for all n checkpoints.

Reference (`bench/reference.py:paper_ie`): per checkpoint, one full forward per alpha with the
reconstruction + error spliced in, gradients w.r.t. latent and error leaves, parameters not frozen,
logits at every position. Project (`crossray.attribution`): the prefix up to block L computed once per
checkpoint, only the suffix re-run, all alphas in one batch, parameters frozen, last-position logits.
Models: n randomly initialised GPT-NeoX of the Pythia-160M shape, hooked at L=6, fp32, or of a HF
config.json (`--model bench/pythia-1b.json`; `--no-reference` at that size).

    python bench/b4_attribution.py [--examples 4] [--tokens 16] [--latents 4096]
    python bench/b4_attribution.py --model bench/pythia-1b.json --layer 9 --latents 16384 --no-reference
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.b3_extract import model_config  # noqa: E402
from bench.common import emit, interleave, machine, parser, rel_err, summary  # noqa: E402
from bench.reference import paper_ie  # noqa: E402
from crossray.attribution import crosscoder_state, token_effects  # noqa: E402
from crossray.config import CrosscoderConfig  # noqa: E402
from crossray.models.crosscoder import Crosscoder  # noqa: E402
from crossray.models.layer import LayerModel, find_blocks  # noqa: E402


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--examples", type=int, default=4)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--latents", type=int, default=4096)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--model", help="a HF config.json of the model to time (default: Pythia-160M's shape)")
    p.add_argument("--no-reference", action="store_true", help="time the project only (large models)")
    args = p.parse_args()
    device = torch.device(args.device)
    from transformers import GPTNeoXForCausalLM

    cfg = model_config(args.model)
    models = []
    for i in range(args.n):
        torch.manual_seed(i)
        m = GPTNeoXForCausalLM(cfg).eval().requires_grad_(False).to(device)
        models.append(LayerModel(m, args.layer, find_blocks(m)))
    cc = Crosscoder(CrosscoderConfig(n_checkpoints=args.n, d_model=cfg.hidden_size, n_latents=args.latents,
                                     dec_init_norm=0.3, seed=0)).to(device).requires_grad_(False)
    ids = torch.randint(0, cfg.vocab_size, (args.examples, args.tokens), device=device)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # one left-padded example
    clean = torch.randint(0, cfg.vocab_size, (args.examples,), device=device)
    patch = torch.randint(0, cfg.vocab_size, (args.examples,), device=device)
    ms = list(range(args.n))

    def project():
        state = crosscoder_state(cc, models, ids, mask)
        return {m: token_effects(cc, models[m], state, m, ids, mask, clean, patch, args.steps) for m in ms}

    def reference():
        return paper_ie(cc, models, ids, mask, clean, patch, args.steps, ms)

    errors = {}
    if not args.no_reference:
        fast, ref = project(), reference()
        errors = {m: max(rel_err(fast[m].ie_BSL, ref[m][0]), rel_err(fast[m].err_BS, ref[m][1])) for m in ms}
        assert max(errors.values()) <= 1e-5, errors
    timed = {"project": project, **({} if args.no_reference else {"reference": reference})}
    times = interleave(timed, args.repeats, device=device)
    med = {k: statistics.median(v) for k, v in times.items()}
    emit({"benchmark": "B4 IE by integrated gradients", "machine": machine(),
          "shape": {"n": args.n, "layer": args.layer, "examples": args.examples, "tokens": args.tokens,
                    "latents": args.latents, "steps": args.steps,
                    "model": f"GPT-NeoX, {args.model or 'Pythia-160M shape'}, random init, fp32"},
          "equivalence_rel_err": errors, **{k: summary(v) for k, v in times.items()},
          "examples_per_s": {k: args.examples / v for k, v in med.items()},
          **({} if args.no_reference else {"speedup_median": med["reference"] / med["project"]})},
         args.out)


if __name__ == "__main__":
    main()
