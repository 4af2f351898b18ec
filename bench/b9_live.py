"""B9: live queries under load. `wrk` on loopback against POST /effects (one pair, every checkpoint,
the run's IG steps), the toy run loaded, while table lookups go on.

    make demo                                                   (once: the toy run in runs/tiny)
    scripts/offline .venv/bin/python bench/b9_live.py           (about 4 minutes)

Phases on one local Ray with the Serve app deployed (table replicas + one model replica):
1. idle: table lookups (feature cards, ranking pages) paced at `--table-rate` for 20 s: their p99;
2. paced: /effects at `--rate` requests/s for `--duration` s, the same table lookups alongside:
   /effects p50/p99 and errors, and the table p99 under that load;
3. saturation: a second copy of the app with batching off (batch_size 1) is deployed under /off, and
   /effects goes as fast as 64 connections go, `--rounds` times 15 s batching on then 15 s off
   (interleaved, so the machine's drift hits both alike): pairs/s of each, and the median of the
   rounds' ratios; then the model deployments alone, the same way: 640 queries through each one's
   handle, 64 in flight.
Targets (issue 13): p99 <= 250 ms at 10 requests/s with 0 errors; batching on >= 3x the pairs/s of
batching off; table p99 under load within 2x of idle.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.b7_serve import calibrate, paths_for, run_wrk  # noqa: E402
from bench.common import emit, machine  # noqa: E402
from tests.helpers import free_port  # noqa: E402

PAIR = {"clean_prefix": "The man near the queens", "clean_answer": " waits", "patch_answer": " wait"}


def deploy(run: str, port: int, replicas: int, batch_size: int, name: str = "crossray", prefix: str = "/"
           ) -> str:
    from ray import serve

    from serve.app import make_app

    serve.run(make_app({"runs": [run], "batch_size": batch_size}, num_replicas=replicas), name=name,
              route_prefix=prefix)
    url = f"http://127.0.0.1:{port}"
    while httpx.get(f"{url}{prefix.rstrip('/')}/health", timeout=5).status_code != 200:
        time.sleep(0.5)
    return url


def handle_rate(run: str, app: str, n: int = 640, in_flight: int = 64) -> float:
    """Queries/s of the model deployment alone (no HTTP): `n` one-pair /effects queries through its
    deployment handle, `in_flight` at a time."""
    import asyncio

    from ray import serve

    handle = serve.get_deployment_handle("LiveModel", app_name=app)

    async def go() -> float:
        gate = asyncio.Semaphore(in_flight)

        async def one():
            async with gate:
                answer = await handle.query.remote("effects", run, {"pairs": [PAIR]})
                assert "error" not in answer, answer

        await asyncio.gather(*[one() for _ in range(in_flight)])  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*[one() for _ in range(n)])
        return n / (time.perf_counter() - start)

    return round(asyncio.run(go()), 2)


def interleaved(on, off) -> dict:
    """One round: batching on, then off (wrk results or queries/s), and the ratio of their rates."""
    rate = (lambda r: r["rps"]) if isinstance(on, dict) else float
    return {"on": on, "off": off, "ratio": rate(on) / rate(off)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default=str(ROOT / "runs" / "tiny"), help="pipeline folder, run id or models:/")
    p.add_argument("--replicas", type=int, default=1, help="table replicas")
    p.add_argument("--rate", type=float, default=10)
    p.add_argument("--table-rate", type=float, default=50)
    p.add_argument("--duration", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="interleaved on/off saturation rounds")
    p.add_argument("--out")
    args = p.parse_args()
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = deploy(args.run, port, args.replicas, args.batch_size)
    run = httpx.get(f"{url}/runs", timeout=5).json()[0]["id"]
    effects = [f"/runs/{run}/effects"]
    body = json.dumps({"pairs": [PAIR]})
    check = httpx.post(url + effects[0], json={"pairs": [PAIR]}, timeout=30)
    assert check.status_code == 200, check.text
    steps, checkpoints = check.json()["steps"], check.json()["checkpoints"]
    tables = paths_for(url, run)

    result = {"benchmark": "B9 live queries", "table_replicas": args.replicas, "model_replicas": 1,
              "batch_size": args.batch_size, "ig_steps": steps, "checkpoints": len(checkpoints),
              "target_rps": args.rate, "cpus": os.cpu_count(), "machine": machine()}
    table_delay = calibrate(url, tables, args.table_rate, 2)
    result["table_idle"] = run_wrk(url, tables, 20, 2, table_delay)

    delay = calibrate(url, effects, args.rate, 2, body)
    under_load: dict = {}
    side = threading.Thread(target=lambda: under_load.update(
        run_wrk(url, tables, args.duration, 2, table_delay)))
    side.start()
    result["effects_paced"] = run_wrk(url, effects, args.duration, 2, delay, body)
    side.join()
    result["table_under_load"] = under_load
    deploy(args.run, port, args.replicas, 1, "crossray-off", "/off")
    off = ["/off" + effects[0]]
    run_wrk(url, effects, 3, 64, 0, body)  # warm-up of both
    run_wrk(url, off, 3, 64, 0, body)
    rounds = [interleaved(run_wrk(url, effects, 15, 64, 0, body), run_wrk(url, off, 15, 64, 0, body))
              for _ in range(args.rounds)]
    handles = [interleaved(handle_rate(run, "crossray"), handle_rate(run, "crossray-off"))
               for _ in range(args.rounds)]
    result["saturation_rounds"] = rounds
    result["handle_rounds"] = handles
    paced, idle, loaded = result["effects_paced"], result["table_idle"], result["table_under_load"]
    result["batching_speedup"] = statistics.median(r["ratio"] for r in rounds)
    result["batching_speedup_model"] = statistics.median(h["ratio"] for h in handles)
    result["table_p99_ratio"] = loaded["p99_ms"] / idle["p99_ms"]
    result["target_met"] = {"p99": paced["p99_ms"] <= 250 and paced["errors"] == 0
                            and paced["rps"] >= 0.95 * args.rate,
                            "batching": result["batching_speedup"] >= 3,
                            "table": result["table_p99_ratio"] <= 2}
    serve.shutdown()
    ray.shutdown()
    emit(result, args.out)


if __name__ == "__main__":
    main()
