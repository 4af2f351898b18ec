"""Peak memory of streaming extraction: the default toy corpus vs 10x it, rows consumed and dropped.

Reads the corpus with Ray Data (`jobs.extract.prepare`), streams one epoch of `jobs.extract.row_stream`
through `iter_torch_batches` (what Ray Train does) and records the peak RSS of the driver and of each
extraction actor (VmHWM, polled), next to the size the activations would take if materialised.
Bounded memory means the peaks barely move with 10x data (the driver holds no token either).

    python bench/memory_stream.py [--factor 10]   (run inside scripts/offline)
"""

from __future__ import annotations

import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import emit, machine, parser  # noqa: E402


def _actor_peaks(peaks: dict, stop: threading.Event) -> None:
    while not stop.is_set():
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if b"RowExtractor" not in (proc / "cmdline").read_bytes():
                    continue
                for line in (proc / "status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peaks[proc.name] = max(peaks.get(proc.name, 0), int(line.split()[1]) * 1024)
            except OSError:
                continue
        time.sleep(0.5)


def run(n_docs: int) -> dict:
    import dataclasses

    from crossray.corpus import CorpusConfig
    from crossray.extract import ExtractConfig
    from crossray.toy.build import ToyConfig, build_toy_family
    from jobs.extract import prepare, row_stream, stream_plan

    fam = build_toy_family(None, ToyConfig())
    cfg = ExtractConfig(family=str(fam), revisions=("step0", "step128", "step1000"), layer=2,
                        corpus=CorpusConfig(source=f"toy:11:{n_docs}", seq_len=64), batch_sequences=64)
    peaks: dict = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_actor_peaks, args=(peaks, stop), daemon=True)
    watcher.start()
    t0 = time.time()
    prep = prepare(cfg)
    plan = dataclasses.replace(stream_plan(prep, 1), epochs=1)
    rows = 0
    stream = row_stream(prep, plan).dataset
    for batch in stream.iter_torch_batches(batch_size=4096, local_shuffle_buffer_size=16384):
        rows += len(batch["acts"])
    stop.set()
    watcher.join()
    return {"documents": n_docs, "rows": rows, "seconds": round(time.time() - t0, 1),
            "materialised_bytes": rows * 3 * 64 * 4,
            "driver_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "actor_peak_rss_bytes": sorted(peaks.values())}


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--factor", type=int, default=10)
    p.add_argument("--base-docs", type=int, default=6000, help="documents in the default toy corpus")
    args = p.parse_args()
    import ray

    from rayenv import runtime_env

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env())
    base = run(args.base_docs)
    big = run(args.base_docs * args.factor)
    emit({"benchmark": "streaming extraction memory", "machine": machine(), "default": base,
          f"x{args.factor}": big}, args.out)


if __name__ == "__main__":
    main()
