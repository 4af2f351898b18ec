"""The model deployment: live IE/RelIE, ablation and activation queries, batched.

Each replica loads, in its constructor (so Serve routes nothing to it before), every run's crosscoder
and checkpoints (`crossray.live.LiveRun`), on a GPU when its `ray_actor_options` give it one, else on
CPU. The table deployment (`serve.app.CrosscoderService`) calls it through a deployment handle, so
table lookups never queue behind model work, and the two scale independently (Serve config).

Queries are batched twice with `@serve.batch` (size and wait configurable; `max_batch_size=1` turns
batching off): each table replica gathers the queries that arrive together and sends them in one
handle call (`HandleClient`), and the model replica merges what piles up while it computes (several
table replicas' batches) without waiting. The /effects queries of one batch run through shared model
batches; ablations and activations run one after another inside it.

A run whose live model cannot be loaded (no weights, a family not present here) is logged and answers
503 with the reason; the table routes still serve it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from ray import serve

from crossray.errors import query_error
from rayenv import torch_worker

logger = logging.getLogger(__name__)

LiveClient = Callable[[str, str, dict], Awaitable[dict]]
"""`await client(kind, run_id, body)`: kind is effects, ablate or activations; the answer is a dict, or
`{"error": kind, "detail": reason}` (`crossray.live.ERROR_KINDS`)."""


def answer_batch(runs: dict, problems: dict[str, str], items: list[tuple[str, str, dict]]) -> list[dict]:
    """Answers for (kind, run id, body) items, in order; the /effects ones of each run in one go. A
    query that fails inside the model fails alone: its batch is re-run one query at a time, and the
    failing one answers a 500 (a defect retrying cannot fix) while the others get their answers."""
    out: list[dict | None] = [None] * len(items)
    effects: dict[str, list[int]] = {}
    for i, (kind, run_id, body) in enumerate(items):
        run = runs.get(run_id)
        if run is None:
            out[i] = query_error(f"live queries are unavailable for run {run_id}: "
                                 f"{problems or 'its model was not loaded'}", "unavailable")
        elif kind == "effects":
            effects.setdefault(run_id, []).append(i)
        elif kind in ("ablate", "activations"):
            out[i] = _alone(getattr(run, kind), body)
        else:
            out[i] = query_error(f"unknown live query {kind!r}", "not_found")
    for run_id, index in effects.items():
        bodies = [items[i][2] for i in index]
        run = runs[run_id]
        try:
            answers = run.effects(bodies)
        except Exception:  # noqa: BLE001 (find the query that fails; answer the others)
            logger.exception("a live /effects batch of %d queries failed; one by one now", len(index))
            answers = [_alone(lambda b, run=run: run.effects([b])[0], b) for b in bodies]
        for i, answer in zip(index, answers, strict=True):
            out[i] = answer
    return out  # type: ignore[return-value]


def _alone(compute: Callable[[dict], dict], body: dict) -> dict:
    try:
        return compute(body)
    except Exception as e:  # noqa: BLE001 (one query's defect must not fail its batch)
        logger.exception("a live query failed")
        return query_error(f"the model failed on this query ({type(e).__name__}: {str(e)[:200]}); retrying "
                           "will not help", "failed")


@serve.deployment(ray_actor_options={"num_cpus": 0.5, "runtime_env": torch_worker()}, max_ongoing_requests=64)
class LiveModel:
    def __init__(self, runs: list[str], cache_dir: str | None = None, tracking_uri: str | None = None,
                 max_batch_size: int = 16):
        import ray

        from crossray.cache import serve_cache_dir
        from crossray.live import open_runs
        from rayenv import compute_device

        logging.basicConfig(level=logging.INFO)
        if tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(tracking_uri)
        gpus = len(ray.get_gpu_ids())
        device = compute_device(gpus)  # the replica's GPU when its ray_actor_options ask for one
        self.where = {"device": device, "gpus": float(gpus)}
        self.runs, self.problems = {}, {}
        for source in runs:
            try:
                for run in open_runs(source, cache_dir or serve_cache_dir(), device):
                    self.runs[run.id] = run
            except Exception as e:  # the tables of this run are still served
                logger.exception("no live model for %s", source)
                self.problems[source] = f"{type(e).__name__}: {e}"
        self.merged.set_max_batch_size(max_batch_size)

    def info(self) -> dict:
        """Where this replica computes: {"device": "cuda" or "cpu", "gpus": the GPUs Ray gave it}."""
        return self.where

    async def query(self, kind: str, run_id: str, body: dict) -> dict:
        """One query (for callers with a handle of their own)."""
        [answer] = await self.query_many([(kind, run_id, body)])
        return answer

    async def query_many(self, items: list[tuple[str, str, dict]]) -> list[dict]:
        """The answers to a batch of (kind, run id, body) queries, in order: what a table replica sends."""
        return await self.merged(items)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0, batch_size_fn=lambda b: sum(map(len, b)))
    async def merged(self, batches: list[list[tuple[str, str, dict]]]) -> list[list[dict]]:
        # No wait here: the table replicas wait to fill their batches; what piles up while this replica
        # computes (several table replicas' batches, or single queries) is merged, up to max_batch_size
        # queries. NOTE: computed on the replica's user-code event loop, not in a worker thread: a
        # thread competes with that loop for the GIL (the suffix passes are Python-heavy on small
        # models), requests then trickle in one at a time and batches stay at size 1 (measured: 61
        # pairs/s against 110 at saturation on 2 cores). Serve answers health checks from its own loop.
        answers = iter(answer_batch(self.runs, self.problems, [item for batch in batches for item in batch]))
        return [[next(answers) for _ in batch] for batch in batches]


class HandleClient:
    """A `LiveClient` over a deployment handle to `LiveModel`, used by a table replica: the live queries
    that reach the replica within `batch_wait_timeout_s` of each other (at most `max_batch_size`) travel
    to the model in one handle call, so a batch of queries costs one hop, not one per query (the hop is
    a large part of a small query's CPU: measured in bench/RESULTS.md, B9). Up to 4 batches are in
    flight at once, so one table replica keeps several model replicas busy. `max_batch_size=1` turns
    batching off.

    One per process: Serve's batch queue belongs to the method, not the instance."""

    def __init__(self, handle, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.02):
        self.handle, self.batching = handle, max_batch_size > 1
        self.where: dict | None = None
        self.send.set_max_batch_size(max_batch_size)
        self.send.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def __call__(self, kind: str, run_id: str, body: dict) -> dict:
        if not self.batching:  # one hop per query, as many in flight as the route lets through
            [answer] = await self.handle.query_many.remote([(kind, run_id, body)])
            return answer
        return await self.send((kind, run_id, body))

    async def info(self) -> dict:
        """`LiveModel.info` of a model replica (asked once: every replica gets the same resources)."""
        if self.where is None:
            self.where = await self.handle.info.remote()
        return self.where

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02, max_concurrent_batches=4)
    async def send(self, items: list[tuple[str, str, dict]]) -> list[dict]:
        return await self.handle.query_many.remote(items)
