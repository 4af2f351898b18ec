"""Builders shared by the crosscoder tests: tiny configs and a planted-dictionary data set."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import torch

from crossray.config import CrosscoderConfig, TrainConfig

ARTIFACTS = Path(os.environ.get("CROSSRAY_TEST_ARTIFACTS",
                                Path(__file__).resolve().parents[1] / "test-artifacts"))
"""Where tests keep screenshots for a person to look at."""


def make_cc_cfg(**overrides) -> CrosscoderConfig:
    base = dict(n_checkpoints=2, d_model=16, n_latents=64, seed=0)
    base.update(overrides)
    return CrosscoderConfig(**base)


def make_train_cfg(cc_cfg: CrosscoderConfig | None = None, **overrides) -> TrainConfig:
    base = dict(crosscoder=cc_cfg or make_cc_cfg(), n_steps=20, batch_size=64, lr=1e-3,
                metrics_every=5, checkpoint_every=10, dead_window_tokens=640)
    base.update(overrides)
    return TrainConfig(**base)


KINDS = {"shared": (1, 1, 1), "emerging": (0, 0, 1), "discontinued": (1, 0, 0), "middle": (0, 1, 0)}
EXPECTED_GROUP = {"shared": "shared by all", "emerging": "C specific", "discontinued": "A specific",
                  "middle": "B specific"}


def planted_dictionary(n_each: int = 8, d_model: int = 32, seed: int = 0):
    """Unit directions per (feature, checkpoint) for 3 checkpoints; zero where a feature is absent.

    Every checkpoint holds the same number of features, so normalisation treats them alike.
    """
    g = torch.Generator().manual_seed(seed)
    kinds = [k for k in KINDS for _ in range(n_each)]
    present_FC = torch.tensor([KINDS[k] for k in kinds], dtype=torch.float32)
    dirs_FCD = torch.nn.functional.normalize(torch.randn(len(kinds), 3, d_model, generator=g), dim=-1)
    return kinds, dirs_FCD * present_FC[:, :, None]


def planted_batches(dirs_FCD: torch.Tensor, n_batches: int, batch_size: int = 512, p: float = 0.06,
                    seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    F = dirs_FCD.shape[0]
    out = []
    for _ in range(n_batches):
        on = (torch.rand(batch_size, F, generator=g) < p).float()
        coef = on * (0.5 + torch.rand(batch_size, F, generator=g))
        out.append(torch.einsum("nf,fcd->ncd", coef, dirs_FCD))
    return out


def registered_checkpoints(storage) -> int:
    """Checkpoints a Ray Train controller has registered (its snapshot), not merely written."""
    import json
    from pathlib import Path

    for snap in Path(storage).glob("**/checkpoint_manager_snapshot.json"):
        try:
            return len(json.loads(snap.read_text())["checkpoint_results"])
        except (OSError, ValueError, KeyError):
            return 0
    return 0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _yaml_config(name: str) -> dict:
    import yaml

    return yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / name).read_text())


def tiny_pipeline_config(tmp_path: Path) -> Path:
    """configs/tiny.yaml as `make demo` runs it: only its output folder and registered name differ."""
    import yaml

    cfg = _yaml_config("tiny.yaml")
    cfg["pipeline"]["out"] = str(tmp_path / "runs")
    cfg.setdefault("launch", {})["register_name"] = "toy-test"
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


ONE_OF_EACH = {"actors": 1, "workers": 1, "cpus_per_actor": 1.0, "cpus_per_worker": 1.0}
"""The light runs' launch: one extraction/attribution actor and one Train worker of a whole CPU each.
On two cores this runs a light pipeline in 2/3 of the time of the default two of each at half a CPU
(fewer Ray worker processes to start, and tasks that reuse warm workers); configs/tiny.yaml sets the
same for `make demo` and `tracked_run`. Two actors and two DDP workers: the multi-node rehearsal and
the jobs' tests (tests/jobs/test_extract_job.py, test_train_job.py, test_attribute_job.py)."""


def light_pipeline_config(tmp_path: Path, toy_dir: Path, out: Path | None = None,
                          changes: dict | None = None) -> Path:
    """The smallest whole pipeline, for the stage graph and the tests of failure, resume, stream mode
    and the paper's method: one task, the checkpoint set pinned (screening still runs, on one more
    revision than the set), 96 sequences, 100 steps of a 128-latent crosscoder. `changes` sets fields by
    dotted name ({"train.n_steps": 40})."""
    import yaml

    cfg = _yaml_config("tiny.yaml")
    cfg["pipeline"].update(out=str(out or tmp_path / "runs"), revisions=["step0", "step128", "step1000"],
                           screen_revisions=["step0", "step64", "step128", "step1000"],
                           tasks=[str(toy_dir / "tasks" / "simple_agreement.jsonl")])
    cfg["launch"] = {"register_name": "toy-light", **ONE_OF_EACH}
    cfg["extract"]["corpus"]["n_sequences"] = 96
    cfg["extract"].update(shard_sequences=48, norm_sequences=48)
    cfg["train"].update(n_steps=100, batch_size=256, checkpoint_every=20, metrics_every=20)
    cfg["train"]["crosscoder"]["n_latents"] = 128
    cfg["evaluate"] = {"eval_sequences": 4}
    cfg["attribution"].update(steps=2)
    cfg["analysis"] = {"context_sequences": 16}
    set_fields(cfg, changes or {})
    path = tmp_path / "light.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def set_fields(cfg: dict, changes: dict) -> None:
    """Set `section.key.subkey` fields of a config dict."""
    for dotted, value in changes.items():
        section, *keys = dotted.split(".")
        target = cfg.setdefault(section, {})
        for k in keys[:-1]:
            target = target.setdefault(k, {})
        target[keys[-1]] = value


def replica_pids(deployment: str = "ServeReplica:crossray:CrosscoderService") -> list[int]:
    """PIDs of a Serve deployment's replicas in this process's own Ray cluster (its descendants)."""
    import psutil

    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            if any(deployment in part for part in p.cmdline()):
                pids.append(p.pid)
        except psutil.Error:  # gone meanwhile
            continue
    return pids


class Chromium:
    """Headless Debian chromium driven over the DevTools protocol (loopback only)."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000"]

    def __init__(self, exe: str, profile: Path):
        import subprocess

        port = free_port()
        self.proc = subprocess.Popen([exe, *self.FLAGS, f"--remote-debugging-port={port}",
                                      f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        import httpx

        deadline = time.time() + 30
        while True:
            try:
                targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json()
                page = next(t for t in targets if t["type"] == "page")
                break
            except (httpx.HTTPError, StopIteration):
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        from websockets.sync.client import connect

        self.ws = connect(page["webSocketDebuggerUrl"], max_size=2**26)
        self.n = 0

    def call(self, method: str, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == self.n:
                assert "error" not in msg, msg
                return msg["result"]

    def eval(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"page never satisfied {expression}")

    def click(self, element: str) -> None:
        """A real mouse click (not element.click()) in the middle of the element the JS expression
        `element` gives, scrolled into view first."""
        box = self.eval(f"(() => {{ const e = {element}; e.scrollIntoView({{block: 'center'}});"
                        " const r = e.getBoundingClientRect();"
                        " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def screenshot(self, path: Path) -> Path:
        import base64

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self):
        self.ws.close()
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=10)


@contextlib.contextmanager
def chromium_page(url: str, profile: Path):
    """Headless Chromium opened on `url` (the test is skipped where Debian's chromium is missing)."""
    import shutil

    import pytest

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    browser = Chromium(exe, profile)
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=url)
        yield browser
    finally:
        browser.close()


def kill_tree(pid: int) -> None:
    """SIGKILL a process and everything it started (a driver and the local Ray cluster it runs: GCS,
    raylet, workers, the Train controller), as a crash of the machine's run would; waits for them."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=30)


def stray_processes(started_before: set[int]) -> list:
    """Processes the test session left alive: in a PID namespace of the suite's own (`scripts/offline`
    sets CROSSRAY_OWN_PIDNS), every process but this one and its parents; elsewhere, this process's
    descendants (zombies and processes older than the session excluded)."""
    import psutil

    me = psutil.Process()
    keep = {me.pid, *(p.pid for p in me.parents())}
    if os.environ.get("CROSSRAY_OWN_PIDNS") == "1":
        candidates = list(psutil.process_iter())
    else:
        candidates = me.children(recursive=True)
    out = []
    for p in candidates:
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.pid in keep or p.pid in started_before or p.status() == psutil.STATUS_ZOMBIE:
                continue
            if p.ppid() == me.pid and "multiprocessing.resource_tracker" in " ".join(p.cmdline()):
                continue  # Python's own helper of this process: it ends with it
            out.append(p)
    return out


class TrackingServer:
    """A real tracking server (sqlite backend under `root`, artifacts in root/artifacts) on 127.0.0.1
    at `port` (a free one when None), started here and stopped by its PID."""

    def __init__(self, root: Path, port: int | None = None):
        import subprocess
        import sys

        root.mkdir(parents=True, exist_ok=True)
        self.root, self.port = root, port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
               "MLFLOW_DISABLE_TELEMETRY": "true"}
        self.proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
                                      "--port", str(self.port), "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                                      "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)

    def wait_ready(self, seconds: float = 60) -> bool:
        import time
        import urllib.request

        deadline = time.time() + seconds
        while time.time() < deadline and self.proc.poll() is None:
            try:
                if urllib.request.urlopen(f"{self.uri}/health", timeout=1).status == 200:
                    return True
            except OSError:
                time.sleep(0.3)
        return False

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)


def light_study_config(tmp_path: Path, toy_dir: Path, out: Path | None = None) -> Path:
    """configs/tiny-study.yaml as small as a study gets: one task, the four revisions screened,
    96 sequences, 120 steps of a 64-latent crosscoder per set (checkpoints every 10: a kill lands
    mid-training), one actor and one Train worker."""
    import yaml

    cfg = _yaml_config("tiny-study.yaml")
    cfg["pipeline"].update(out=str(out or tmp_path / "runs"), screen_revisions=cfg["pipeline"]["revisions"],
                           tasks=[str(toy_dir / "tasks" / "simple_agreement.jsonl")], screen_examples=8)
    cfg["launch"] = {"register_name": "toy-study-test", **ONE_OF_EACH}
    cfg["evaluate"]["eval_sequences"] = 4
    cfg["extract"]["corpus"]["n_sequences"] = 96
    cfg["extract"].update(shard_sequences=48, norm_sequences=48)
    cfg["train"].update(n_steps=120, batch_size=256, checkpoint_every=10, metrics_every=60)
    cfg["train"]["crosscoder"]["n_latents"] = 64
    cfg["attribution"].update(steps=2, top_k=5)
    cfg["analysis"] = {"context_sequences": 8}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
