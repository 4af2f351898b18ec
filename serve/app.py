"""The Ray Serve application: finished crossray runs behind HTTP.

    crossray serve --run models:/crossray-toy-tiny@champion          (local Ray, http://127.0.0.1:8000)
    crossray-serve --run runs/tiny                                    (the same; this module's entry point)
    crossray serve --run runs/tiny --run <mlflow run id> --port 8000 --token-env CROSSRAY_TOKEN
    serve deploy serve/config.yaml                                    (a cluster; replicas, autoscaling)

Design choices:
- One deployment class; `__init__` loads the runs (a pipeline folder, an MLflow run id or a registered
  `models:/name@alias`) and `__serve_build_asgi_app__` hands Serve the FastAPI app of `serve.api`.
  A replica takes traffic only once loaded; a source that cannot be loaded fails the deployment with
  its reason.
- Read-only and stateless, so replicas are interchangeable: Serve routes around a dead one and
  replaces it; autoscaling settings live in the Serve config.
- Live queries (IE/RelIE, ablations, activations for input sent in a request) go through a deployment
  handle to a second deployment, `serve.model.LiveModel`, which holds the crosscoders and checkpoints
  (on GPU replicas in production); it batches and autoscales on its own. `live: false` leaves it out.
- Binds to 127.0.0.1 unless `--host` says otherwise; the bearer token is read from an environment
  variable (never from the config file), and is off by default.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path

import mlflow
from ray import serve

from crossray.cache import serve_cache_dir
from crossray.cli import error_line
from crossray.config import load_config
from crossray.store import TRACKING_DB, run_folder
from rayenv import torch_worker
from serve.api import ServiceState, build_api
from serve.model import HandleClient, LiveModel
from serve.schemas import LiveLimits

logger = logging.getLogger(__name__)


@serve.deployment(ray_actor_options={"num_cpus": 0.5, "runtime_env": torch_worker()}, max_ongoing_requests=64)
@serve.ingress()
class CrosscoderService:
    def __init__(self, runs: list[str], token: str | None = None, cache_dir: str | None = None,
                 tracking_uri: str | None = None, live=None, limits: dict | None = None,
                 batch_size: int = 16, batch_wait_s: float = 0.02, allowed_hosts: list[str] | None = None):
        logging.basicConfig(level=logging.INFO)
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        self.state = ServiceState(runs, cache_dir or serve_cache_dir())
        # NOTE: loaded before the constructor returns, so Serve routes nothing to a replica (a fresh one,
        # or the replacement of a dead one) until its runs are loaded; the proxy answers 503 meanwhile.
        self.state.load()
        if not self.state.ready:
            raise RuntimeError(self.state.error)
        self.token = token
        self.live = HandleClient(live, batch_size, batch_wait_s) if live is not None else None
        self.limits = LiveLimits(**(limits or {}))
        self.allowed_hosts = allowed_hosts

    def __serve_build_asgi_app__(self):
        return build_api(self.state, self.token, live=self.live, limits=self.limits,
                         allowed_hosts=self.allowed_hosts)


def build_app(args: dict) -> serve.Application:
    """The application from Serve config `args` (the `import_path` of serve/config.yaml)."""
    return make_app(args)


def make_app(args: dict, live_options: dict | None = None, **options) -> serve.Application:
    """The application from `args`: runs (required), token_env, cache_dir, tracking_uri, live (default
    true), batch_size, batch_wait_s, limits (`serve.schemas.LiveLimits` fields), allowed_hosts (the Host
    headers answered: a workstation's service without a token, safe from DNS rebinding); `options` are
    the table deployment's options (num_replicas, ...), `live_options` the model deployment's."""
    allowed = {"runs", "token_env", "cache_dir", "tracking_uri", "live", "batch_size", "batch_wait_s",
               "limits", "allowed_hosts"}
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise ValueError(f"unknown serve argument(s) {unknown}; allowed: {sorted(allowed)}")
    runs = args.get("runs")
    if not runs or not isinstance(runs, list) or not all(isinstance(r, str) for r in runs):
        raise ValueError("serve argument 'runs' must be a non-empty list of MLflow run ids, models:/ URIs "
                         "or folders")
    token = None
    if args.get("token_env"):
        token = os.environ.get(args["token_env"])
        if not token:
            raise ValueError(f"token_env {args['token_env']!r} is set but the variable is empty or missing")
    runs = [str(Path(r).resolve()) if Path(r).is_dir() else r for r in runs]  # replicas have another cwd
    limits = args.get("limits") or {}
    try:
        LiveLimits(**limits)  # unknown caps fail here, not in a replica
    except TypeError as e:
        raise ValueError(f"serve argument 'limits': {e}; allowed: {list(LiveLimits.__dataclass_fields__)}"
                         ) from None
    deployment = CrosscoderService.options(**options) if options else CrosscoderService
    tracking_uri = args.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    batch_size, batch_wait_s = int(args.get("batch_size", 16)), float(args.get("batch_wait_s", 0.02))
    if batch_size < 1 or batch_wait_s < 0:
        raise ValueError(f"serve arguments batch_size (got {batch_size}) must be >= 1 and batch_wait_s (got "
                         f"{batch_wait_s}) >= 0")
    live = None
    if args.get("live", True):
        model = LiveModel.options(**live_options) if live_options else LiveModel
        live = model.bind(runs, args.get("cache_dir"), tracking_uri, batch_size)
    hosts = args.get("allowed_hosts")
    if hosts is not None and not (isinstance(hosts, list) and all(isinstance(h, str) and h for h in hosts)):
        raise ValueError("serve argument 'allowed_hosts' must be a list of host names (e.g. [127.0.0.1, "
                         "localhost])")
    return deployment.bind(runs, token, args.get("cache_dir"), tracking_uri, live, limits, batch_size,
                           batch_wait_s, hosts)


def check_sources(runs: list[str], cache_dir: Path) -> None:
    """Resolve every run before deploying, so a wrong id is one error line, not a failing replica."""
    from crossray.results import is_study_folder, load_run, load_study

    origin: dict[str, str] = {}
    for source in runs:
        found = load_study(source)[1] if is_study_folder(source) else [load_run(source, cache_dir)]
        for run in found:
            if run.id in origin:
                raise ValueError(f"two runs are named {run.id}: {origin[run.id]} and {source}; serve them "
                                 f"from folders of different names")
            origin[run.id] = source


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="crossray serve", description="serve finished runs over HTTP")
    p.add_argument("--run", action="append", default=[],
                   help="pipeline folder (a study folder: every set), MLflow run id, or models:/name@alias "
                   "(repeatable)")
    p.add_argument("--config", action="append", default=[],
                   help="a run config (YAML): serve its pipeline folder <pipeline.out>/<pipeline.name>")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--token-env", help="environment variable holding a bearer token to require")
    p.add_argument("--allowed-host", action="append", dest="allowed_hosts",
                   help="a Host header to answer (repeatable; others get 400): protects a service without "
                   "a token from DNS rebinding, e.g. --allowed-host 127.0.0.1 --allowed-host localhost")
    default_uri = f"sqlite:///runs/{TRACKING_DB}"  # pipeline.out's default
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", default_uri),
                   help=f"MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the pipeline's "
                   f"{default_uri})")
    p.add_argument("--cache-dir", default=str(serve_cache_dir()), help="where MLflow artifacts are cached")
    p.add_argument("--address", default=None, help="Ray address (default: start or join a local one)")
    p.add_argument("--no-live", action="store_true", help="serve the stored tables only (no model "
                   "deployment, so no /effects, /ablate or /activations)")
    p.add_argument("--live-gpus", type=float, default=0, help="GPUs per model replica (default: CPU)")
    p.add_argument("--batch-size", type=int, default=16, help="live queries batched per model call "
                   "(1: no batching)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.run += [str(run_folder(c.pipeline.out, c.pipeline.name)) for c in map(load_config, args.config)]
    except ValueError as e:
        error_line(e)
        return 2
    if not args.run:
        p.error("give at least one --run or --config")
    cache = str(Path(args.cache_dir).resolve())
    uri = args.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # replicas have another cwd
        uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    mlflow.set_tracking_uri(uri)  # the sources are checked here; the replicas get `uri` passed
    try:
        app = make_app({"runs": args.run, "token_env": args.token_env, "cache_dir": cache,
                        "tracking_uri": uri, "live": not args.no_live, "batch_size": args.batch_size,
                        "allowed_hosts": args.allowed_hosts},
                       {"ray_actor_options": {"num_cpus": 0.5, "num_gpus": args.live_gpus,
                                              "runtime_env": torch_worker()}},
                       num_replicas=args.replicas)
        check_sources(args.run, Path(cache))
    except ValueError as e:
        error_line(e)
        return 2
    return _serve_until_stopped(app, args)


def _serve_until_stopped(app, args: argparse.Namespace) -> int:
    """Start Ray and Serve, deploy `app`, and serve until SIGINT or SIGTERM."""
    from rayenv import init_ray

    init_ray(args.address)

    def interrupt(*_):
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own handlers
        signal.signal(sig, interrupt)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name="crossray", route_prefix="/")
        print(f"crossray serving {len(args.run)} run(s) at http://{args.host}:{args.port}/ "
              f"(API docs at /docs); Ctrl-C stops", flush=True)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        logger.info("stopping")
    finally:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
