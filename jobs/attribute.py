"""Distributed attribution: IE of every crosscoder feature per checkpoint per task, RelIE, ablation.

    python -m jobs.attribute --config configs/tiny.yaml --crosscoder runs/tiny/train/crosscoder \
        --out runs/x/effects [--pipeline.tasks a.jsonl,dir] [--attribution.steps 8]
    ray job submit --working-dir . -- python -m jobs.attribute ... --launch.gpus_per_actor 1

A pool of actors each holds every checkpoint of the set and the crosscoder once (the latent is shared,
so every unit needs all checkpoints' activations). Work fans out as (task, checkpoint, example shard)
units; their effect sums are added per task, turned into means and RelIE, and the selected features
go through the zero-ablation check. Output: effects.parquet + effects.csv (task, feature, checkpoint,
ie, relie, relie_class, group, all_zero) and summary.json (per task: examples kept and skipped, metric
and error-term effect per checkpoint, selected features, ablation correlations), written atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import ray
import torch
from ray.util import ActorPool

from crossray import attribution as AT
from crossray.checkpoints import Family, resolve_family
from crossray.config import AttributionConfig, LaunchConfig
from crossray.models.layer import load_layer_model, load_tokenizer
from crossray.pipeline.inputs import task_files
from crossray.progress import Progress
from crossray.store import EFFECTS, SUMMARY, load_crosscoder, write_tables
from crossray.tasks import TaskError, load_tasks
from jobs._ray import job_parser, run_job
from rayenv import compute_device, torch_worker

logger = logging.getLogger(__name__)


class AttributionActor:
    """Holds the checkpoints and the crosscoder once; computes effect sums for units of work."""

    def __init__(self, crosscoder_dir: str, family: Family, revisions: list[str], layer: int,
                 num_gpus: float = 0, dtype: str = "float32"):
        device = compute_device(num_gpus)
        self.cc = load_crosscoder(crosscoder_dir, device)
        self.models = [load_layer_model(family, r, layer, dtype=dtype, device=device) for r in revisions]
        self.tokenizer = load_tokenizer(family, revisions[0])
        AT.check_crosscoder_fits(self.cc, self.models, revisions)

    def effects(self, examples, cfg: AttributionConfig, m: int) -> AT.EffectSums:
        return AT.task_effects(self.cc, self.models, self.tokenizer, examples, cfg, checkpoint_indices=[m])

    def ablation(self, examples, features: list[int], skip_first_position: bool) -> torch.Tensor:
        return AT.ablation_deltas(self.cc, self.models, self.tokenizer, examples, features,
                                  skip_first_position=skip_first_position)


def run_attribute(crosscoder_dir: str | Path, family: Family, task_specs: list[str], out: str | Path,
                  cfg: AttributionConfig, launch: LaunchConfig | None = None, shard_examples: int = 64,
                  on_progress: Callable[[dict], None] | None = None) -> dict:
    crosscoder_dir = Path(crosscoder_dir).resolve()  # actors may run in another working directory
    cc = load_crosscoder(crosscoder_dir)
    revisions = list(cc.cfg.revisions)
    if not revisions or cc.cfg.layer is None:
        raise ValueError(f"{crosscoder_dir}: the crosscoder config records no checkpoints or layer")
    for rev in revisions:
        family.location(rev)  # a missing revision fails here, before any actor starts
    tokenizer = load_tokenizer(family, revisions[0])
    tasks = load_tasks(task_specs, tokenizer)
    for t in tasks:
        if not t.examples:
            raise TaskError(f"task {t.name}: no example with single-token answers is left "
                            f"(skipped {dict(t.skipped)})")
    baselines = [AT.task_baseline(t, tokenizer, cfg) for t in tasks]  # a mixed task fails before Ray
    launch = launch or LaunchConfig()
    remote = ray.remote(num_cpus=launch.cpus_per_actor, num_gpus=launch.gpus_per_actor,
                        runtime_env=torch_worker())(AttributionActor)
    pool_actors = [remote.remote(str(crosscoder_dir), family, revisions, cc.cfg.layer, launch.gpus_per_actor,
                                 cfg.dtype) for _ in range(launch.actors)]
    pool = ActorPool(pool_actors)
    units = [(ti, m, s) for ti, t in enumerate(tasks) for m in range(len(revisions))
             for s in range(0, len(t.examples), shard_examples)]
    def submit(actor, unit):
        ti, m, start = unit
        return actor.effects.remote(tasks[ti].examples[start:start + shard_examples],
                                    AT.for_task(cfg, baselines[ti]), m)

    sums: dict[int, AT.EffectSums] = {}
    progress = Progress("attribute", sum(len(tasks[ti].examples[s:s + shard_examples]) for ti, _, s in units),
                        "examples", report=on_progress)  # an example counts once per checkpoint
    for (ti, _, _), part in zip(units, pool.map(submit, units), strict=True):  # map keeps the order
        sums[ti] = part if ti not in sums else sums[ti] + part
        progress.update(part.n_examples)
    progress.close()
    rows, summary = [], {"crosscoder": str(crosscoder_dir), "revisions": revisions,
                         "layer": cc.cfg.layer, "config": cfg.__dict__, "tasks": {}}
    for ti, task in enumerate(tasks):
        actor = pool_actors[ti % len(pool_actors)]
        total = sums[ti]._replace(n_examples=sums[ti].n_examples // len(revisions))  # counted per checkpoint
        info, task_rows = AT.summarise(task, total, cc, revisions, cfg,
                                       lambda ex, feats, a=actor: ray.get(
                                           a.ablation.remote(ex, feats, cfg.skip_first_position)),
                                       baselines[ti])
        summary["tasks"][task.name] = info.to_json()
        rows += task_rows
    write_tables(out, {EFFECTS: rows}, {SUMMARY: summary})
    return summary


def main(argv: list[str] | None = None) -> int:
    p = job_parser("IE and RelIE of crosscoder features with Ray")
    p.add_argument("--crosscoder", required=True, help="folder with weights.safetensors + config.json")
    p.add_argument("--out", required=True)

    def prepare(args, cfg):
        pc = cfg.pipeline
        family = resolve_family(pc.family, naming=pc.naming, tokenizer=pc.tokenizer)
        cc_cfg = load_crosscoder(args.crosscoder).cfg
        if pc.revisions and list(pc.revisions) != list(cc_cfg.revisions):
            raise ValueError(f"crosscoder was trained on checkpoints {list(cc_cfg.revisions)}, "
                             f"not on {list(pc.revisions)}")
        if pc.layer != cc_cfg.layer:
            raise ValueError(f"crosscoder was trained at layer {cc_cfg.layer}, not at layer {pc.layer}")
        return family, task_files(pc.tasks, family)

    def work(args, cfg, prepared) -> dict:
        family, tasks = prepared
        return run_attribute(args.crosscoder, family, tasks, args.out, cfg.attribution, cfg.launch)

    return run_job(p, argv, "attribute", prepare, work, lambda args: args.out,
                   lambda args, summary: {"out": args.out, "tasks": {
                       k: {"examples": v["examples"], "ablation": v.get("ablation")}
                       for k, v in summary["tasks"].items()}})


if __name__ == "__main__":
    raise SystemExit(main())
