"""The checks and the summary of `bench/gpu.sh` (its last steps).

    python bench/gpu_summary.py devices RUN.json EXPECTED   every stage of a `crossray run --json` summary
                                                            (a plain run's or a study's, every set) ran on
                                                            EXPECTED (cuda or cpu); exit 1 naming any other
    python bench/gpu_summary.py throughput OUT               OUT/throughput.json from B3 (extraction, bf16 and
                                                            fp32 weights), B1 (training) and B4 (attribution):
                                                            what `crossray plan --throughput` reads

Throughputs are model FLOP/s of one device, counted as `crossray plan` counts them: extraction 2 x the
prefix's parameters per token and checkpoint (B3's `model_flops_per_s`), training 6 x the crosscoder's
parameters per row (B1 at the paper's width: 2 F n D + n D + F parameters).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def stage_devices(summary: dict) -> dict[str, str]:
    """Every stage's recorded device: `stage`, or `set/stage` for a study's sets."""
    out = dict(summary.get("devices", {}))
    for name, s in summary.get("sets", {}).items():
        if s.get("status") == "failed":
            out[f"{name}/(failed)"] = s.get("error", "failed")
        out.update({f"{name}/{stage}": d for stage, d in s.get("devices", {}).items()})
    return out


def devices(path: str, expected: str) -> int:
    lines = [x for x in Path(path).read_text().splitlines() if x.startswith("{")]
    if not lines:
        print(f"{path}: no JSON summary (the run failed: see its log)")
        return 1
    found = stage_devices(json.loads(lines[-1]))
    wrong = {k: v for k, v in found.items() if v != expected}
    print(json.dumps({"run": path, "expected": expected, "devices": found}))
    if not found or wrong:
        print(f"{path}: stages not on {expected}: {wrong or 'none recorded'}")
        return 1
    return 0


def _read(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


def throughput(out: str) -> int:
    out = Path(out)
    b1 = _read(out, "b1_paper")["results"][0]
    n, d, f = (b1["shape"][k] for k in ("n", "D", "F"))
    extract = {dtype: _read(out, f"extract_{dtype}") for dtype in ("bfloat16", "float32")}
    attribution = _read(out, "attribution")
    machine = extract["bfloat16"]["machine"]
    result = {
        "device": machine.get("gpu") or machine.get("cpu_model") or machine.get("cpu"),
        "date": machine.get("date"), "torch": machine.get("torch"), "source": "bench/gpu.sh",
        "extract_flops_per_s": {k: v["model_flops_per_s"] for k, v in extract.items()},
        "extract_tokens_per_s": {k: v["tokens_per_s"]["project"] for k, v in extract.items()},
        "extract_shape": extract["bfloat16"]["shape"],
        "train_flops_per_s": 6 * (2 * f * n * d + n * d + f) * b1["tokens_per_s"]["project"],
        "train_rows_per_s": b1["tokens_per_s"]["project"], "train_mfu": b1.get("mfu"),
        "train_shape": b1["shape"],
        "attribution_examples_per_s": attribution["examples_per_s"]["project"],
        "attribution_shape": attribution["shape"],
    }
    (out / "throughput.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "devices":
        return devices(argv[1], argv[2])
    if len(argv) == 2 and argv[0] == "throughput":
        return throughput(argv[1])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
