"""B8: streamed extraction into training (the pipeline's stream mode) against each stage alone.

    scripts/offline .venv/bin/python bench/b8_stream.py          (about 8 minutes on 2 cores)

A random GPT-NeoX of Pythia-160M width (12 layers, d_model 768; the toy tokenizer and vocabulary),
3 checkpoints hooked at layer 6, the toy corpus in 64-token sequences; one local Ray with 2 CPUs,
2 extraction actors and 2 Train workers (0.5 CPU each). Same run, same rows:
- extract: the row Dataset of the extraction actors consumed by the driver (tokens/s, wall);
- train: Ray Train on the same rows held in memory (tokens/s, from rank 0's progress x workers);
- stream: Ray Train fed by the extraction actors through its shuffle buffer, as `extract.mode: stream`.
On this machine both stages share the cores, so the reference is their serial combination
1 / (1/extract + 1/train) (target stream >= 0.85 of it). Then the streamed run again at 4x the tokens:
peak RSS of the driver, the extraction actors and the Train workers (target: within 20% of 1x), and
the bytes written under the Ray session and storage folders during the run, Train checkpoints (the
crosscoder and its Adam state) apart from the rest (target: the rest is logs, under 1% of the
activations).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import emit, machine, parser  # noqa: E402

PROCS = {"actor": b"RowExtractor", "worker": b"RayTrainWorker"}
"""Processes whose peak RSS is polled, by their command line; the driver's own is polled too."""


def family(folder: Path) -> Path:
    """3 random GPT-NeoX checkpoints of Pythia-160M width with the toy tokenizer (built once)."""
    import torch
    import transformers as tf

    from crossray.toy.build import ToyConfig, build_toy_family

    if (folder / "step3" / "config.json").exists():
        return folder
    toy = build_toy_family(None, ToyConfig()) / "step0"
    vocab = tf.AutoTokenizer.from_pretrained(toy).vocab_size + 8
    config = tf.GPTNeoXConfig(vocab_size=vocab, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                              intermediate_size=3072, max_position_embeddings=2048)
    for i in (1, 2, 3):
        torch.manual_seed(i)
        tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder / f"step{i}")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(toy / name, folder / f"step{i}" / name)
    return folder


def _rss(status: str, field: str) -> int:
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith(field))


def _peaks(peaks: dict, stop: threading.Event) -> None:
    while not stop.is_set():
        peaks["driver"] = max(peaks.get("driver", 0), _rss(Path("/proc/self/status").read_text(), "VmRSS:"))
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes()
                kind = next((k for k, tag in PROCS.items() if tag in cmd), None)
                if kind is None:
                    continue
                peaks[kind] = max(peaks.get(kind, 0), _rss((proc / "status").read_text(), "VmHWM:"))
            except OSError:
                continue
        time.sleep(0.5)


def _written(*folders: Path) -> dict:
    """Bytes in files under `folders`: Ray Train checkpoints (the crosscoder and its optimizer state)
    apart from everything else (logs, spilled objects, anything activation-sized)."""
    out = {"checkpoints": 0, "other": 0}
    for folder in folders:
        for f in folder.rglob("*") if folder.exists() else ():
            if f.is_file():
                kind = "checkpoints" if any(part.startswith("checkpoint_") for part in f.parts) else "other"
                out[kind] += f.stat().st_size
    return out


def _delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def train_run(cfg, launch, storage: Path, norms, stream, workers: int) -> dict:
    from jobs.train import run_train

    seen: list[dict] = []
    start = time.perf_counter()
    run_train(cfg, launch, storage, norms, stream=stream, on_progress=seen.append)
    wall = time.perf_counter() - start
    last = seen[-1]
    return {"tokens_per_s": last["tokens_per_s"] * workers, "steps": last["done"], "wall_s": round(wall, 1),
            "fit_s": round(last["elapsed_s"], 1)}


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--sequences", type=int, default=96, help="1x: sequences of 64 tokens")
    p.add_argument("--family-dir", default=str(Path(tempfile.gettempdir()) / "crossray-b8-family"))
    args = p.parse_args()
    os.environ["CROSSRAY_PROGRESS_SECONDS"] = "2"
    import dataclasses
    import gc

    import numpy as np
    import pyarrow as pa
    import ray

    from crossray.config import CrosscoderSettings, LaunchConfig, TrainSettings, resolve_train
    from crossray.corpus import CorpusConfig
    from crossray.extract import ExtractConfig
    from jobs.extract import DataPosition, RowStream, estimate_norms, prepare, row_stream, stream_plan

    fam = family(Path(args.family_dir))
    launch = LaunchConfig(actors=2, workers=2)
    from rayenv import runtime_env

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,  # as the jobs start Ray
             runtime_env=runtime_env({"PYTHONPATH": str(ROOT), "CROSSRAY_PROGRESS_SECONDS": "2"}))
    session = Path(ray._private.worker._global_node.get_session_dir_path())

    def setup(n_seq: int):
        ecfg = ExtractConfig(family=str(fam), revisions=("step1", "step2", "step3"), layer=6,
                             corpus=CorpusConfig(source=f"toy:11:{n_seq * 4}", seq_len=64, n_sequences=n_seq),
                             batch_sequences=8, norm_sequences=8)
        prep = prepare(ecfg)
        rows = prep.n_sequences * 63
        tcfg = resolve_train(TrainSettings(crosscoder=CrosscoderSettings(n_latents=2048),
                                           n_steps=rows // 128 - 2, batch_size=128, metrics_every=5,
                                           checkpoint_every=10**6, shuffle_buffer_rows=1024), 3, 768)
        return ecfg, prep, tcfg, rows

    result = {"benchmark": "B8 streamed extraction into training", "cpus": os.cpu_count(),
              "machine": machine(), "model": "GPT-NeoX d768 x12 (random), 3 checkpoints, layer 6",
              "crosscoder_latents": 2048, "actors": 2, "workers": 2}
    ecfg, prep, tcfg, rows = setup(args.sequences)
    norms = estimate_norms(prep)
    # extraction alone: one epoch of the row stream drained by the driver (kept for training alone)
    one_epoch = dataclasses.replace(stream_plan(prep, rows), epochs=1)
    start, parts = time.perf_counter(), []
    epoch_rows = row_stream(prep, one_epoch, launch).dataset
    for batch in epoch_rows.iter_batches(batch_size=1024, batch_format="numpy"):
        parts.append({k: batch[k] for k in ("item", "row", "acts")})
    extract_s = time.perf_counter() - start
    cols = {k: np.concatenate([p[k] for p in parts]) for k in ("item", "row", "acts")}
    result["extract"] = {"rows": int(len(cols["acts"])), "wall_s": round(extract_s, 1),
                         "tokens_per_s": len(cols["acts"]) / extract_s}
    tmp = Path(tempfile.mkdtemp(prefix="b8-"))
    acts = pa.FixedShapeTensorArray.from_numpy_ndarray(cols["acts"])
    in_memory = ray.data.from_arrow(pa.table({"item": cols["item"], "row": cols["row"], "acts": acts}))
    result["train"] = train_run(tcfg, launch, tmp / "train", norms,
                                RowStream(in_memory, one_epoch, DataPosition.remote()), 2)
    del cols, parts, batch, in_memory, acts
    gc.collect()
    disk_before = _written(session, tmp)
    peaks: dict = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_peaks, args=(peaks, stop), daemon=True)
    watcher.start()
    result["stream"] = train_run(tcfg, launch, tmp / "stream", norms,
                                 row_stream(prep, stream_plan(prep, rows), launch), 2)
    result["stream"]["peak_bytes"] = dict(peaks)
    result["stream"]["bytes_written"] = _delta(_written(session, tmp), disk_before)
    e, t = result["extract"]["tokens_per_s"], result["train"]["tokens_per_s"]
    result["serial_reference_tokens_per_s"] = 1 / (1 / e + 1 / t)
    result["stream_vs_serial"] = result["stream"]["tokens_per_s"] / result["serial_reference_tokens_per_s"]

    # 4x the tokens, streamed: memory flat?
    peaks.clear()
    ecfg4, prep4, tcfg4, rows4 = setup(4 * args.sequences)
    before = _written(session, tmp)
    result["stream_4x"] = train_run(tcfg4, launch, tmp / "stream4", norms,
                                    row_stream(prep4, stream_plan(prep4, rows4), launch), 2)
    result["stream_4x"]["peak_bytes"] = dict(peaks)
    result["stream_4x"]["bytes_written"] = _delta(_written(session, tmp), before)
    stop.set()
    result["activation_bytes_if_materialised"] = {"1x": rows * 3 * 768 * 2, "4x": rows4 * 3 * 768 * 2}
    p1, p4 = result["stream"]["peak_bytes"], result["stream_4x"]["peak_bytes"]
    result["peak_ratio_4x_over_1x"] = {k: p4[k] / p1[k] for k in p1 if k in p4 and p1[k]}
    result["target_met"] = {"throughput": result["stream_vs_serial"] >= 0.85,
                            "memory_flat": all(r <= 1.2 for r in result["peak_ratio_4x_over_1x"].values()),
                            "no_activation_bytes": result["stream_4x"]["bytes_written"]["other"]
                            < result["activation_bytes_if_materialised"]["4x"] / 100}
    shutil.rmtree(tmp, ignore_errors=True)
    ray.shutdown()
    emit(result, args.out)


if __name__ == "__main__":
    main()
