"""B3: activation extraction, corpus tokens/s through all n checkpoints.

Reference: per checkpoint `model(ids, output_hidden_states=True)` in fp32, keep hidden_states[L].
Project: `LayerModel.resid_pre` (forward stops at block L, no LM head), inference mode, bf16 weights
where the device runs bf16 fast. Models: n randomly initialised GPT-NeoX of the Pythia-160M shape.
FLOPs per token and checkpoint: L * (24 d^2 + 4 S d).

    python bench/b3_extract.py [--n 3] [--layer 6] [--batch 8] [--seq 256]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import emit, gemm_peak, interleave, machine, parser, rel_err, summary  # noqa: E402
from crossray.models.layer import LayerModel, find_blocks  # noqa: E402
from crossray.train import _cpu_has_fast_bf16  # noqa: E402


def pythia_160m_shape():
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, rotary_pct=0.25, max_position_embeddings=2048)


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    args = p.parse_args()
    device = torch.device(args.device)
    from transformers import GPTNeoXForCausalLM

    cfg = pythia_160m_shape()
    fast_dtype = torch.bfloat16 if device.type == "cuda" or _cpu_has_fast_bf16() else torch.float32
    refs, fast = [], []
    for i in range(args.n):
        torch.manual_seed(i)
        m = GPTNeoXForCausalLM(cfg).eval().requires_grad_(False).to(device)
        refs.append(m)
        mb = GPTNeoXForCausalLM(cfg).eval().requires_grad_(False)
        mb.load_state_dict(m.state_dict())
        mb = mb.to(device, fast_dtype)
        fast.append(LayerModel(mb, args.layer, find_blocks(mb)))
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)

    def reference():
        with torch.no_grad():
            return [m(input_ids=ids, output_hidden_states=True).hidden_states[args.layer] for m in refs]

    def project():
        with torch.inference_mode():
            return [lm.resid_pre(ids) for lm in fast]

    errors = [rel_err(a, b) for a, b in zip(project(), reference(), strict=True)]
    tol = 1e-2 if fast_dtype == torch.bfloat16 else 1e-5
    assert max(errors) <= tol, errors
    times = interleave({"reference": reference, "project": project}, args.repeats, device=device)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = args.batch * args.seq
    d = cfg.hidden_size
    flops = args.n * tokens * args.layer * (24 * d * d + 4 * args.seq * d)
    peak = gemm_peak(tokens, d, 4 * d, torch.bfloat16, device)
    emit({"benchmark": "B3 extraction", "machine": machine(),
          "shape": {"n": args.n, "layer": args.layer, "batch": args.batch, "seq": args.seq,
                    "model": "GPT-NeoX, Pythia-160M shape, random init"},
          "project_dtype": str(fast_dtype), "equivalence_rel_err": errors,
          "reference": summary(times["reference"]), "project": summary(times["project"]),
          "tokens_per_s": {k: tokens / v for k, v in med.items()},
          "speedup_median": med["reference"] / med["project"],
          "gemm_peak_flops_bf16": peak, "project_flops": flops / med["project"],
          "fraction_of_bf16_gemm_peak": flops / med["project"] / peak}, args.out)


if __name__ == "__main__":
    main()
