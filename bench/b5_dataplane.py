"""B5: data plane, shuffled (B, C, D) batches supplied vs consumed by the trainer, rows/s.

Supply: (a) the Parquet shard reader with its local shuffle buffer (`crossray.extract.shuffled_batches`,
bf16 shards of n*D rows), (b) Ray Data `iter_torch_batches` with a local shuffle buffer over the same
rows (the streaming path's iterator). Consumption: `Trainer.step_batch` at the B1 shape.
Target: supply >= 2x consumption.

    python bench/b5_dataplane.py [--rows 131072] [--batch 4096]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.b1_train import build  # noqa: E402
from bench.common import emit, machine, parser  # noqa: E402
from crossray.extract import shuffled_batches, write_shard  # noqa: E402


def rate(batches, limit_s: float = 30.0) -> float:
    rows, t0 = 0, time.perf_counter()
    for b in batches:
        rows += len(b)
        if time.perf_counter() - t0 > limit_s:
            break
    return rows / (time.perf_counter() - t0)


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=131072)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--latents", type=int, default=4096)
    p.add_argument("--ray", action="store_true", help="also measure the Ray Data iterator")
    args = p.parse_args()
    shard_rows = 16384
    out: dict = {"benchmark": "B5 data plane", "machine": machine(),
                 "shape": {"n": args.n, "D": args.d, "batch": args.batch, "rows": args.rows,
                           "storage": "bfloat16 Parquet shards of 16384 rows"}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(args.rows // shard_rows):
            acts = np.random.randn(shard_rows, args.n, args.d).astype(np.float32)
            rows = {"seq": np.arange(shard_rows) + i * shard_rows, "pos": np.ones(shard_rows, np.int32),
                    "acts": acts}
            paths.append(Path(tmp) / f"shard-{i:06d}.parquet")
            write_shard(paths[-1], rows, "bfloat16")
        rate(shuffled_batches(paths[:1], args.batch, 8192, 0))  # warm the page cache
        supply = [rate(shuffled_batches(paths, args.batch, 65536, s)) for s in range(3)]
        out["supply_rows_per_s_shard_reader"] = float(np.median(supply))
        if args.ray:
            import ray

            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            ds = ray.data.from_numpy(np.random.randn(args.rows, args.n, args.d).astype(np.float32))
            ds = ds.materialize()
            it = lambda s: (b["data"] for b in ds.iter_torch_batches(  # noqa: E731
                batch_size=args.batch, local_shuffle_buffer_size=65536, local_shuffle_seed=s))
            out["supply_rows_per_s_ray_data"] = float(np.median([rate(it(s)) for s in range(3)]))
            ray.shutdown()
    trainer, *_ = build(args.n, args.d, args.latents, args.batch, torch.device(args.device))
    x = torch.randn(args.batch, args.n, args.d)
    for _ in range(2):
        trainer.step_batch(x)
    t0, steps = time.perf_counter(), 10
    for _ in range(steps):
        trainer.step_batch(x)
    consume = steps * args.batch / (time.perf_counter() - t0)
    out["consumption_rows_per_s"] = consume
    out["supply_over_consumption"] = {k.removeprefix("supply_rows_per_s_"): v / consume
                                      for k, v in out.items() if k.startswith("supply_rows")}
    emit(out, args.out)


if __name__ == "__main__":
    main()
