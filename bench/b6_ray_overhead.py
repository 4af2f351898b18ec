"""B6: Ray overhead, extraction of the toy corpus in one process vs the Ray Data job on the same cores.

Both do the same work: hash the checkpoints, read and tokenise the corpus, load the checkpoints,
extract every shard and write it (`crossray.extract.extract_shard`). In-process: one process, torch
on every core. Ray: `jobs.extract.run_extract` (the corpus read by Ray Data tasks, then 2 actors x
0.5 CPU) on a local 2-CPU cluster, actor start-up and model loading included. Interleaved repeats.
Target: Ray path >= 0.8x the in-process throughput.

    python bench/b6_ray_overhead.py [--sequences 1024]   (run inside scripts/offline)
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import emit, machine, parser  # noqa: E402


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--sequences", type=int, default=16384)
    args = p.parse_args()
    import ray

    from crossray.config import LaunchConfig
    from crossray.corpus import CorpusConfig, load_sequences
    from crossray.extract import (
        CheckpointSetExtractor,
        ExtractConfig,
        extract_family,
        extract_shard,
        resolve_hashes,
        shard_plan,
    )
    from crossray.models.layer import load_tokenizer
    from crossray.toy.build import ToyConfig, build_toy_family
    from jobs.extract import run_extract

    fam = build_toy_family(None, ToyConfig())
    cfg = ExtractConfig(family=str(fam), revisions=("step0", "step128", "step1000"), layer=2,
                        corpus=CorpusConfig(source="toy:7", seq_len=64, n_sequences=args.sequences),
                        shard_sequences=256, batch_sequences=32)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    def in_process():
        out = Path(tempfile.mkdtemp())
        resolve_hashes(cfg)
        tokens, _ = load_sequences(cfg.corpus, load_tokenizer(extract_family(cfg), cfg.revisions[0]))
        extractor = CheckpointSetExtractor(cfg, "cpu")
        for i, start, stop in shard_plan(len(tokens), cfg.shard_sequences):
            extract_shard(extractor, tokens[start:stop].numpy(), i, start, out)
        shutil.rmtree(out)

    def with_ray():
        out = Path(tempfile.mkdtemp())
        run_extract(cfg, out / "acts", LaunchConfig(actors=2, cpus_per_actor=0.5))
        shutil.rmtree(out)

    times: dict[str, list[float]] = {"in_process": [], "ray": []}
    with_ray()  # warm-up: worker processes, imports
    for _ in range(args.repeats):
        for name, fn in (("in_process", in_process), ("ray", with_ray)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    tokens_total = args.sequences * 63
    med = {k: statistics.median(v) for k, v in times.items()}
    emit({"benchmark": "B6 Ray overhead (extraction)", "machine": machine(),
          "shape": {"sequences": args.sequences, "seq_len": 64, "checkpoints": 3, "family": "toy"},
          "seconds": times, "tokens_per_s": {k: tokens_total / v for k, v in med.items()},
          "ray_over_in_process": med["in_process"] / med["ray"]}, args.out)
    ray.shutdown()


if __name__ == "__main__":
    main()
