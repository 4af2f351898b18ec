"""Benchmark helpers: interleaved timing, same-run GEMM peak, equivalence checks, JSON output.

Method (../shared/docs/benchmarks.md): reference and project path in one process, warm-up, then
interleaved repeats (A B A B ...); report median and min of each and the ratio of medians; time a
GEMM of the benchmark's shape in fp32 and bf16 in the same run; check equivalence before timing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


CPU = torch.device("cpu")


def interleave(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 2,
               device: torch.device = CPU) -> dict[str, list[float]]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return times


def summary(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times)}


def gemm_peak(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, repeats: int = 5
              ) -> float:
    """FLOP/s of an (m, k) @ (k, n) matmul, median of `repeats`."""
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    times = interleave({"g": lambda: a @ b}, repeats, device=device)["g"]
    return 2 * m * k * n / statistics.median(times)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def machine() -> dict:
    info = {"date": date.today().isoformat(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}
    try:  # lscpu's model and the flags that decide the bf16 GEMM rate (environment.md)
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu_model"] = next(x.split(":", 1)[1].strip() for x in cpuinfo.splitlines()
                                 if x.startswith("model name"))
        flags = next(x.split(":", 1)[1].split() for x in cpuinfo.splitlines() if x.startswith("flags"))
        info["bf16_flags"] = sorted(f for f in flags if f in ("amx_bf16", "amx_tile", "avx512_bf16"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def emit(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


# Which ATen op a step's time belongs to (self time, so nested ops are not counted twice).
PROFILE_GROUPS = {
    "gemm": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_embedding_bag",
             "aten::_embedding_bag_backward", "aten::_embedding_bag_dense_backward",
             "aten::_embedding_bag_per_sample_weights_backward", "aten::embedding_dense_backward"),
    "selection": ("aten::topk", "aten::kthvalue", "aten::sort", "aten::nonzero", "aten::index_put_",
                  "aten::index_fill_", "aten::searchsorted", "aten::index", "aten::_index_put_impl_"),
    "casts": ("aten::copy_", "aten::_to_copy", "aten::to", "aten::_copy_from_and_resize"),
    "optimizer": ("aten::_fused_adam_", "aten::_foreach_norm", "aten::_foreach_mul_", "aten::zero_",
                  "aten::_foreach_add_", "aten::_foreach_addcmul_", "aten::_foreach_addcdiv_",
                  "aten::_foreach_sqrt", "aten::_foreach_div_", "aten::_foreach_lerp_"),
}


def profile_shares(step: Callable[[], None], steps: int = 5) -> dict:
    """Share of a step's self CPU time in GEMMs (dense and embedding_bag), selection, dtype casts,
    the optimizer and the rest (elementwise and reductions), over `steps` profiled steps; with the
    ten costliest ops, so the next regression is seen where it happens."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    ops = [(e.key, e.self_cpu_time_total) for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(t for _, t in ops) or 1.0
    shares = dict.fromkeys([*PROFILE_GROUPS, "elementwise"], 0.0)
    for name, t in ops:
        group = next((g for g, names in PROFILE_GROUPS.items() if name in names), "elementwise")
        shares[group] += t / total
    top = sorted(ops, key=lambda o: -o[1])[:10]
    return {"shares": {k: round(v, 3) for k, v in shares.items()},
            "top_ops": {name: round(t / total, 3) for name, t in top}}
