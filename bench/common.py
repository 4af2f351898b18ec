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
