"""B3: activation extraction, corpus tokens/s through all n checkpoints.

Reference: per checkpoint `model(ids, output_hidden_states=True)` in fp32, keep hidden_states[L].
Project: `CheckpointSetExtractor` over `LayerModel.resid_pre` (forward stops at block L, no LM head),
inference mode, bf16 weights where the device runs bf16 fast (`--dtype float32`: fp32 weights, under
bf16 autocast on a GPU, as the paper configs extract). Models: n randomly initialised GPT-NeoX of the
Pythia-160M shape, or of a HF config.json (`--model bench/pythia-1b.json`: random weights run exactly
as fast as trained ones). FLOPs per token and checkpoint: L * (24 d^2 + 4 S d); `model_flops_per_s`
counts 2 x the prefix's parameters per token, as `crossray plan` does.

    python bench/b3_extract.py [--n 3] [--layer 6] [--batch 8] [--seq 256]
    python bench/b3_extract.py --model bench/pythia-1b.json --layer 9 --seq 1024 --batch 4 --no-reference
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import emit, gemm_peak, interleave, machine, parser, rel_err, summary  # noqa: E402
from crossray.extract import CheckpointSetExtractor  # noqa: E402
from crossray.models.layer import LayerModel, find_blocks  # noqa: E402
from crossray.train import _cpu_has_fast_bf16  # noqa: E402


def pythia_160m_shape():
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, rotary_pct=0.25, max_position_embeddings=2048)


def model_config(path: str | None):
    """The GPT-NeoX config to time: a HF config.json, else the Pythia-160M shape."""
    if path is None:
        return pythia_160m_shape()
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--model", help="a HF config.json of the model to time (default: Pythia-160M's shape)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="the project's weights (auto: bf16 where the device runs it fast)")
    p.add_argument("--no-reference", action="store_true", help="time the project only (large models)")
    args = p.parse_args()
    device = torch.device(args.device)
    from transformers import GPTNeoXForCausalLM

    from crossray.config import CorpusConfig, ExtractConfig

    cfg = model_config(args.model)
    fast = torch.bfloat16 if device.type == "cuda" or _cpu_has_fast_bf16() else torch.float32
    dtype = fast if args.dtype == "auto" else getattr(torch, args.dtype)
    refs, models = [], []
    for i in range(args.n):
        torch.manual_seed(i)
        m = GPTNeoXForCausalLM(cfg).eval().requires_grad_(False)
        if not args.no_reference:
            refs.append(m.to(device))
            m = GPTNeoXForCausalLM(cfg).eval().requires_grad_(False)
            m.load_state_dict(refs[-1].state_dict())
        m = m.to(device, dtype)
        models.append(LayerModel(m, args.layer, find_blocks(m)))
    ecfg = ExtractConfig(family="random", revisions=tuple(f"m{i}" for i in range(args.n)), layer=args.layer,
                         corpus=CorpusConfig(source="random", seq_len=args.seq, n_sequences=args.batch),
                         batch_sequences=args.batch, compute_dtype=str(dtype).removeprefix("torch."))
    extractor = CheckpointSetExtractor.of_models(ecfg, models, device)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))

    def reference():
        with torch.no_grad():
            return [m(input_ids=ids.to(device), output_hidden_states=True).hidden_states[args.layer]
                    for m in refs]

    def project():
        return extractor(ids)  # (batch, seq, n, d) on the CPU, as the extraction actors keep them

    record = {}
    if refs:
        acts = project()
        errors = [rel_err(acts[:, :, c].to(device), r) for c, r in enumerate(reference())]
        autocast = device.type == "cuda" and dtype == torch.float32
        tol = 1e-2 if dtype == torch.bfloat16 or autocast else 1e-5
        assert max(errors) <= tol, errors
        record["equivalence_rel_err"] = errors
    timed = {"project": project, **({"reference": reference} if refs else {})}
    times = interleave(timed, args.repeats, device=device)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = args.batch * args.seq
    d = cfg.hidden_size
    flops = args.n * tokens * args.layer * (24 * d * d + 4 * args.seq * d)
    prefix_params = sum(p.numel() for p in models[0].blocks[:args.layer].parameters())
    peak = gemm_peak(tokens, d, 4 * d, torch.bfloat16, device)
    emit({"benchmark": "B3 extraction", "machine": machine(),
          "shape": {"n": args.n, "layer": args.layer, "batch": args.batch, "seq": args.seq,
                    "model": f"GPT-NeoX, {args.model or 'Pythia-160M shape'}, random init", "d_model": d},
          "project_dtype": str(dtype), "autocast": device.type == "cuda" and dtype == torch.float32,
          **record, **{k: summary(v) for k, v in times.items()},
          "tokens_per_s": {k: tokens / v for k, v in med.items()},
          **({"speedup_median": med["reference"] / med["project"]} if refs else {}),
          "gemm_peak_flops_bf16": peak, "project_flops": flops / med["project"],
          "model_flops_per_s": 2 * prefix_params * tokens * args.n / med["project"],
          "fraction_of_bf16_gemm_peak": flops / med["project"] / peak}, args.out)


if __name__ == "__main__":
    main()
