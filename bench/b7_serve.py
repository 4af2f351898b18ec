"""B7: Serve latency. `wrk` on loopback against feature lookup and RelIE ranking, the toy run loaded.

    make demo                                                   (once: the toy run in runs/tiny)
    scripts/offline .venv/bin/python bench/b7_serve.py          (about 3 minutes)

Three phases on one local Ray with the Serve app deployed (2 replicas by default):
1. paced: `--rate` requests/s for `--duration` s (wrk connections each wait so that together they send
   the target rate; the achieved rate is reported), p50/p90/p99 and errors;
2. saturation: as fast as `--connections` connections go for 20 s: the highest sustained rate;
3. replica kill: paced again for 30 s, one replica SIGKILLed after 10 s: failed requests / all.
The request mix alternates full feature cards (with top contexts) and ranking pages (RelIE and |IE|,
every checkpoint, several tasks and offsets). Target (benchmarks.md): p99 <= 20 ms at 200 requests/s,
0 errors.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import emit, machine  # noqa: E402
from tests.helpers import free_port, replica_pids  # noqa: E402


def paths_for(url: str, run: str) -> list[str]:
    info = httpx.get(f"{url}/runs/{run}", timeout=10).json()
    revs = [c["revision"] for c in info["checkpoints"]]
    tasks = [t["name"] for t in info["tasks"]]
    paths = []
    for i in range(48):
        paths.append(f"/runs/{run}/features/{(i * 37) % info['n_latents']}")
        by = "relie" if i % 2 == 0 else "abs_ie"
        paths.append(f"/runs/{run}/tasks/{tasks[i % len(tasks)]}/ranking?checkpoint={revs[i % len(revs)]}"
                     f"&by={by}&offset={(i % 4) * 25}&limit=25")
    return paths


def lua_script(paths: list[str], delay_ms: float, body: str | None = None) -> str:
    """wrk cycling through `paths` (GET, or POST of the JSON `body`), paced by `delay_ms` per request."""
    items = ",\n".join(json.dumps(p) for p in paths)
    pace = f"function delay() return {delay_ms:.3f} end" if delay_ms > 0 else ""
    send = 'wrk.format("GET", paths[i])' if body is None else \
        f'wrk.format("POST", paths[i], {{["Content-Type"] = "application/json"}}, {json.dumps(body)})'
    return f"""local paths = {{
{items}
}}
local i = 0
function setup(thread) thread:set("id", math.random(1, #paths)) end
function init(args) i = id end
function request()
  i = i % #paths + 1
  return {send}
end
{pace}
"""


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def run_wrk(url: str, paths: list[str], seconds: int, connections: int, delay_ms: float,
            body: str | None = None) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(lua_script(paths, delay_ms, body))
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "5s",
                          "-s", f.name, url], capture_output=True, text=True, check=True).stdout
    os.unlink(f.name)
    rows = re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    pct = {int(p): float(v) * UNITS[u] for p, v, u in rows}
    total = int(re.search(r"(\d+) requests in", out)[1])
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(non2xx[1]) if non2xx else 0
    errors += sum(map(int, socket_errors.groups())) if socket_errors else 0
    return {"requests": total, "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1]),
            "p50_ms": pct[50], "p90_ms": pct[90], "p99_ms": pct[99], "errors": errors,
            "connections": connections, "delay_ms": round(delay_ms, 3), "seconds": seconds}


def calibrate(url: str, paths: list[str], rate: float, connections: int, body: str | None = None) -> float:
    """The per-connection delay (ms) at which `connections` connections together send `rate` requests/s."""
    delay = connections * 1000 / rate
    probe = run_wrk(url, paths, 5, connections, delay, body)
    delay = max(0.0, delay - probe["p50_ms"])  # the request's own latency is part of the period
    probe = run_wrk(url, paths, 5, connections, delay, body)
    return max(0.0, delay * probe["rps"] / rate)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default=str(ROOT / "runs" / "tiny"), help="pipeline folder, run id or models:/")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--rate", type=float, default=200)
    p.add_argument("--duration", type=int, default=60)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--out")
    args = p.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    import ray
    from ray import serve

    from serve.app import make_app

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(make_app({"runs": [args.run]}, num_replicas=args.replicas), name="crossray", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    while httpx.get(f"{url}/health", timeout=5).status_code != 200:
        time.sleep(0.5)
    run = httpx.get(f"{url}/runs", timeout=5).json()[0]["id"]
    paths = paths_for(url, run)
    for path in paths[:4]:
        assert httpx.get(url + path, timeout=5).status_code == 200, path

    result = {"benchmark": "B7 serve latency", "replicas": args.replicas, "target_rps": args.rate,
              "cpus": os.cpu_count(), "machine": machine()}
    delay = calibrate(url, paths, args.rate, args.connections)
    result["paced"] = run_wrk(url, paths, args.duration, args.connections, delay)
    result["saturation"] = run_wrk(url, paths, 20, 8, 0)

    victim = replica_pids()[0]
    timer = threading.Timer(10, os.kill, (victim, signal.SIGKILL))
    timer.start()
    kill = run_wrk(url, paths, 30, args.connections, delay)
    timer.join()
    deadline = time.time() + 60
    while time.time() < deadline and (len(replica_pids()) < args.replicas or victim in replica_pids()):
        time.sleep(0.5)
    kill["killed_pid"] = victim
    kill["replaced"] = len(replica_pids()) == args.replicas and victim not in replica_pids()
    kill["error_fraction"] = kill["errors"] / max(1, kill["requests"])
    result["replica_kill"] = kill
    result["target_met"] = result["paced"]["p99_ms"] <= 20 and result["paced"]["errors"] == 0 \
        and result["paced"]["rps"] >= 0.95 * args.rate
    serve.shutdown()
    ray.shutdown()
    emit(result, args.out)


if __name__ == "__main__":
    main()
