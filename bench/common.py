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


# benchmarks.md: MFU = FLOPs/token x tokens/s / 790e12, the bf16 matmul rate measured on an H100 here.
H100_BF16_FLOPS = 790e12


def gpu_figures(flops_per_token: float, tokens_per_s: float, step: Callable[[], None],
                device: torch.device) -> dict:
    """On a GPU: MFU against the measured H100 bf16 rate, and the memory one step takes (peak
    allocated during it, and how much of that the step itself allocated on top of what was resident).
    Empty on a CPU."""
    if device.type != "cuda":
        return {}
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device)
    step()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"mfu": flops_per_token * tokens_per_s / H100_BF16_FLOPS,
            "peak_memory_gib": peak / 2**30, "step_transient_memory_gib": (peak - resident) / 2**30}


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


def failed(checks: dict[str, bool]) -> list[str]:
    """The names of the equivalence checks that failed. A benchmark records them beside its figures
    and exits non-zero (`emit`): a fast path that is wrong is not fast, but the figures of a one-shot
    run on a lent GPU are still worth reading beside the failure."""
    return [name for name, ok in checks.items() if not ok]


def emit(result: dict, out: str | None) -> None:
    """Print the JSON (and write it to `out`); exit 1 after that if any equivalence check failed."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    failures = [f for r in [result, *result.get("results", [])] for f in r.get("equivalence_failed", [])]
    if failures:
        raise SystemExit(f"equivalence checks failed: {failures}")


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


def profile_shares(step: Callable[[], None], steps: int = 5, device: torch.device = CPU) -> dict:
    """Share of a step's self time in GEMMs (dense and embedding_bag), selection, dtype casts, the
    optimizer and the rest (elementwise and reductions), over `steps` profiled steps; with the ten
    costliest ops, so the next regression is seen where it happens. On a GPU the time is the
    kernels' own (self device time), not the host's launch time."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    step()
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if gpu else [])]) as prof:
        for _ in range(steps):
            step()
        sync(device)
    attr = "self_device_time_total" if gpu else "self_cpu_time_total"
    ops = [(e.key, getattr(e, attr)) for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(t for _, t in ops) or 1.0
    shares = dict.fromkeys([*PROFILE_GROUPS, "elementwise"], 0.0)
    for name, t in ops:
        group = next((g for g, names in PROFILE_GROUPS.items() if name in names), "elementwise")
        shares[group] += t / total
    top = sorted(ops, key=lambda o: -o[1])[:10]
    return {"shares": {k: round(v, 3) for k, v in shares.items()},
            "top_ops": {name: round(t / total, 3) for name, t in top}}
