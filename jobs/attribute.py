"""Distributed attribution: IE of every crosscoder feature per checkpoint per task, RelIE, ablation.

    python -m jobs.attribute --crosscoder runs/x/crosscoder --family toy \
        --task path/to/simple_agreement.jsonl --task path/to/tasks_dir --out runs/x/effects
    ray job submit --working-dir . -- python -m jobs.attribute ... --gpus-per-actor 1

A pool of actors each holds every checkpoint of the set and the crosscoder once (the latent is shared,
so every unit needs all checkpoints' activations). Work fans out as (task, checkpoint, example shard)
units; their effect sums are added per task, turned into means and RelIE, and the selected features
go through the zero-ablation check. Output: effects.parquet + effects.csv (task, feature, checkpoint,
ie, relie, relie_class, group, all_zero) and summary.json (per task: examples kept and skipped, metric
and error-term effect per checkpoint, selected features, ablation correlations), written atomically.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import ray
import torch
from ray.util import ActorPool

from crossray import attribution as AT
from crossray.checkpoints import Family, resolve_family
from crossray.models.layer import load_layer_model, load_tokenizer
from crossray.store import load_crosscoder, write_tables
from crossray.tasks import Task, TaskError, load_tasks
from jobs._ray import init_ray

logger = logging.getLogger(__name__)


class AttributionActor:
    """Holds the checkpoints and the crosscoder once; computes effect sums for units of work."""

    def __init__(self, crosscoder_dir: str, family: Family, revisions: list[str], layer: int,
                 num_gpus: float = 0):
        device = "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.cc = load_crosscoder(crosscoder_dir, device)
        self.models = [load_layer_model(family, r, layer, device=device) for r in revisions]
        self.tokenizer = load_tokenizer(family, revisions[0])
        AT.check_crosscoder_fits(self.cc, self.models, revisions)

    def effects(self, examples, cfg: AT.AttributionConfig, m: int) -> AT.EffectSums:
        return AT.task_effects(self.cc, self.models, self.tokenizer, examples, cfg, checkpoints=[m])

    def ablation(self, examples, features: list[int]) -> torch.Tensor:
        return AT.ablation_deltas(self.cc, self.models, self.tokenizer, examples, features)


def run_attribute(crosscoder_dir: str | Path, family: Family, task_specs: list[str], out: str | Path,
                  cfg: AT.AttributionConfig, actors: int = 2, cpus_per_actor: float = 0.5,
                  gpus_per_actor: float = 0, shard_examples: int = 64) -> dict:
    crosscoder_dir = Path(crosscoder_dir).resolve()  # actors may run in another working directory
    cc = load_crosscoder(crosscoder_dir)
    revisions = list(cc.cfg.checkpoints)
    if not revisions or cc.cfg.layer is None:
        raise ValueError(f"{crosscoder_dir}: the crosscoder config records no checkpoints or layer")
    for rev in revisions:
        family.location(rev)  # a missing revision fails here, before any actor starts
    tasks = load_tasks(task_specs, load_tokenizer(family, revisions[0]))
    for t in tasks:
        if not t.examples:
            raise TaskError(f"task {t.name}: no example with single-token answers is left "
                            f"(skipped {dict(t.skipped)})")
    remote = ray.remote(num_cpus=cpus_per_actor, num_gpus=gpus_per_actor)(AttributionActor)
    pool_actors = [remote.remote(str(crosscoder_dir), family, revisions, cc.cfg.layer, gpus_per_actor)
                   for _ in range(actors)]
    pool = ActorPool(pool_actors)
    units = [(ti, m, s) for ti, t in enumerate(tasks) for m in range(len(revisions))
             for s in range(0, len(t.examples), shard_examples)]
    def submit(actor, unit):
        ti, m, start = unit
        return actor.effects.remote(tasks[ti].examples[start:start + shard_examples], cfg, m)

    sums: dict[int, AT.EffectSums] = {}
    for (ti, _, _), part in zip(units, pool.map(submit, units), strict=True):  # map keeps the order
        sums[ti] = part if ti not in sums else sums[ti] + part
    rows, summary = [], {"crosscoder": str(crosscoder_dir), "revisions": revisions,
                         "layer": cc.cfg.layer, "config": cfg.__dict__, "tasks": {}}
    for ti, task in enumerate(tasks):
        rows += _summarise(task, sums[ti], cc, revisions, cfg, pool_actors[ti % actors], summary)
    write_tables(out, {"effects": rows}, {"summary.json": summary})
    return summary


def _summarise(task: Task, sums: AT.EffectSums, cc, revisions, cfg, actor, summary) -> list[dict]:
    n_examples = sums.n_examples // len(revisions)  # every checkpoint counted the examples once
    ie_CL = sums.ie_sum_CL / n_examples
    selected = AT.top_features(ie_CL, cfg.top_k)
    info = {"examples": n_examples, "skipped": dict(task.skipped), "selected": selected,
            "metric": (sums.metric_sum_C / n_examples).tolist(),
            "error_effect": (sums.err_sum_C / n_examples).tolist()}
    if len(selected) >= 3:
        deltas = ray.get(actor.ablation.remote(task.examples, selected))
        norms = cc.decoder_norms().detach()[selected]
        info["ablation"] = AT.ablation_correlations(deltas, ie_CL[:, selected].T, norms)
    summary["tasks"][task.name] = info
    return AT.effects_rows(task.name, ie_CL, revisions, cfg)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="IE and RelIE of crosscoder features with Ray")
    p.add_argument("--crosscoder", required=True, help="folder with weights.safetensors + config.json")
    p.add_argument("--family", required=True, help="toy, a local family folder, or a hub repo")
    p.add_argument("--task", action="append", required=True, help="task file or folder (repeatable)")
    p.add_argument("--out", required=True)
    p.add_argument("--revisions", help="comma-separated; must match the crosscoder's checkpoints")
    p.add_argument("--layer", type=int, help="must match the crosscoder's layer")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threshold", type=float, default=0.1)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--cpus-per-actor", type=float, default=0.5)
    p.add_argument("--gpus-per-actor", type=float, default=0)
    p.add_argument("--address", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        family = resolve_family(args.family)
        cc_cfg = load_crosscoder(args.crosscoder).cfg
        if args.revisions and args.revisions.split(",") != list(cc_cfg.checkpoints):
            raise ValueError(f"crosscoder was trained on checkpoints {list(cc_cfg.checkpoints)}, "
                             f"not on {args.revisions.split(',')}")
        if args.layer is not None and args.layer != cc_cfg.layer:
            raise ValueError(f"crosscoder was trained at layer {cc_cfg.layer}, not at layer {args.layer}")
        cfg = AT.AttributionConfig(steps=args.steps, threshold=args.threshold, top_k=args.top_k)
    except (ValueError, OSError) as e:
        print(f"crossray: error: {e}", file=sys.stderr)
        return 2
    init_ray(args.address)
    try:
        summary = run_attribute(args.crosscoder, family, args.task, args.out, cfg, args.actors,
                                args.cpus_per_actor, args.gpus_per_actor)
    except (ValueError, OSError) as e:
        print(f"crossray: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": args.out, "tasks": {k: {"examples": v["examples"],
                                                     "ablation": v.get("ablation")}
                                                 for k, v in summary["tasks"].items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
