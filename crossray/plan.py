"""What a configuration will cost before it runs: tokens, bytes, memory, GPU hours (`crossray plan`).

The estimates are arithmetic on the config and the model's shape (read from a checkpoint's
`config.json`, local or in the hub cache, else from `KNOWN_SHAPES`), so planning never loads or
downloads weights. Formulas (C checkpoints, D = d_model, L latents, N training rows):

- tokens = n_sequences x (seq_len - 1 if drop_first_position else seq_len): the activation rows;
- activation_bytes = tokens x C x D x bytes(storage_dtype): the activations if materialised;
- mode: `auto` picks parquet when activation_bytes <= max_disk_gb, else stream;
- disk_bytes = activation_bytes (parquet only) + Ray Train checkpoints (2 kept + 1 being written +
  the final copy, each weights + Adam moments: 4 x 3 bytes per crosscoder parameter) + tables
  (effects: L x C x tasks rows, contexts: L x (C + 1) x k windows, about 100 bytes a row);
- corpus_bytes = (n_sequences + eval_sequences) x seq_len x 4: the token ids, read by Ray Data and
  kept in the object store (spread over the nodes, spilled to disk by Ray past its share of memory);
  the driver holds 32 bytes of digest per sequence;
- crosscoder parameters = 2 L C D + C D + L;
- peak per extraction actor = C x prefix parameters x bytes(compute_dtype) + a batch's residuals
  (batch_sequences x seq_len x D x (4 C + 32) bytes: the kept fp32 rows, and the block in flight);
- peak per Train worker = 16 bytes per crosscoder parameter (weights, gradient, Adam m and v) + its
  batch (rows x (12 C D + 8 L) bytes) + its shuffle buffer (rows x C x D x 4 bytes);
- GPU hours = FLOPs / (rate x MFU): extraction 2 x prefix parameters x tokens x C; training
  6 x crosscoder parameters x n_steps x batch_size; evaluation 4 x model parameters x C x held-out
  tokens. Rate: the bf16 matmul rate measured on an H100 here (790e12 FLOP/s, benchmarks.md); half of
  it for the fp32 (TF32) crosscoder; MFU 0.4 for extraction and evaluation, 0.3 for training (the
  B1/B3 GPU targets). Attribution is left out (minutes at the paper's size). Wall hours divide each
  stage's GPU hours by its GPU count (actors, Train workers).
- Measured throughputs (`crossray plan --throughput FILE`, the file `bench/gpu.sh` writes, or the
  user's own) replace rate x MFU: the model FLOP/s one GPU achieved extracting (per compute dtype;
  evaluation's forward passes use the figure of `evaluate.dtype`) and training (B3 and B1 at the
  paper's width), counted with the same FLOP formulas, so the hours are those of the measuring GPU.

A study (`study_plan`): the union of its sets' revisions extracted once; every set's crosscoder
trained by one Train job (its GPU hours the sum of the sets', each worker holding every set's
crosscoder and step plus one shuffle buffer of the union's rows); each set's tables and Train
checkpoints; beside it what the sets would cost run apart.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from crossray.config import Config

H100_BF16 = 790e12
MFU = {"extract": 0.4, "train": 0.3, "evaluate": 0.4}
BYTES = {"bfloat16": 2, "float32": 4}
TABLE_ROW_BYTES = 100


@dataclass(frozen=True)
class Shape:
    d_model: int
    n_layers: int
    vocab: int
    d_mlp: int

    def block_params(self) -> int:
        return 4 * self.d_model**2 + 2 * self.d_model * self.d_mlp


KNOWN_SHAPES = {  # (d_model, layers, vocab, d_mlp) of public checkpoint families, for offline planning
    "pythia-70m": Shape(512, 6, 50304, 2048), "pythia-160m": Shape(768, 12, 50304, 3072),
    "pythia-410m": Shape(1024, 24, 50304, 4096), "pythia-1b": Shape(2048, 16, 50304, 8192),
    "pythia-1.4b": Shape(2048, 24, 50304, 8192), "pythia-2.8b": Shape(2560, 32, 50304, 10240),
    "pythia-6.9b": Shape(4096, 32, 50432, 16384), "pythia-12b": Shape(5120, 36, 50688, 20480),
    "olmo-1b-hf": Shape(2048, 16, 50304, 16384), "olmo-7b-hf": Shape(4096, 32, 50304, 22016),
    "olmo-1b-0724-hf": Shape(2048, 16, 50304, 16384),  # the paper's OLMo (configs/olmo-1b.yaml)
    "bloom-1b1": Shape(1536, 24, 250880, 6144), "bloom-1b1-intermediate": Shape(1536, 24, 250880, 6144),
}


def _from_config(cfg: dict) -> Shape:
    d = cfg.get("hidden_size") or cfg.get("d_model") or cfg["n_embd"]
    layers = cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg["n_layers"]
    d_mlp = cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * d
    return Shape(int(d), int(layers), int(cfg["vocab_size"]), int(d_mlp))


def model_shape(family_spec: str, revision: str | None) -> Shape:
    """The model's shape from a checkpoint's config.json (a local family, or the hub cache), else the
    table of known families; a ValueError names the family when neither knows it."""
    from crossray.checkpoints import resolve_family

    try:
        family = resolve_family(family_spec)
        src, sub = family.location(revision or family.available_revisions()[0])
        if Path(src).is_dir():
            return _from_config(json.loads((Path(src) / "config.json").read_text()))
        from transformers import AutoConfig

        return _from_config(AutoConfig.from_pretrained(src, revision=sub).to_dict())
    except Exception:
        name = family_spec.rstrip("/").split("/")[-1].lower()
        if name in KNOWN_SHAPES:
            return KNOWN_SHAPES[name]
        raise ValueError(f"cannot tell the shape of {family_spec} without its config.json (not local, "
                         f"not in the hub cache); known offline: {sorted(KNOWN_SHAPES)}") from None


def free_bytes(out: str | Path) -> int:
    """Free space on the file system that will hold `out` (its nearest existing parent)."""
    path = Path(out).resolve()
    existing = next(d for d in [path, *path.parents] if d.exists())
    return shutil.disk_usage(existing).free


ASSUMED = {"source": "assumed", "device": "H100",
           "flops_per_s": {"extract": H100_BF16 * MFU["extract"], "train": H100_BF16 / 2 * MFU["train"],
                           "evaluate": H100_BF16 * MFU["evaluate"]}}


def load_throughput(path: str | Path) -> dict:
    """Measured throughputs from a JSON file: {"device": ..., "extract_flops_per_s": {"bfloat16": ...,
    "float32": ...}, "train_flops_per_s": ...} (model FLOP/s of one GPU; other fields are kept). A
    ValueError names the file and what is missing or wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"throughput file {path}: {e}") from None
    extract = data.get("extract_flops_per_s") if isinstance(data, dict) else None
    problems = [f"extract_flops_per_s.{k}" for k in ("bfloat16", "float32")
                if not isinstance(extract, dict) or not _positive(extract.get(k))]
    if not _positive(data.get("train_flops_per_s") if isinstance(data, dict) else None):
        problems.append("train_flops_per_s")
    if problems:
        raise ValueError(f"throughput file {path} needs positive model FLOP/s in {', '.join(problems)} "
                         f"(bench/gpu.sh writes them to $OUT/throughput.json)")
    return {**data, "path": str(path)}


def _positive(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and x > 0


def rates(cfg: Config, throughput: dict | None) -> dict:
    """Model FLOP/s per GPU of each stage, and where the figures come from."""
    if throughput is None:
        return ASSUMED
    extract = throughput["extract_flops_per_s"]
    return {"source": throughput["path"], "device": throughput.get("device", "unnamed"),
            "flops_per_s": {"extract": extract[cfg.extract.compute_dtype],
                            "train": throughput["train_flops_per_s"],
                            "evaluate": extract[cfg.evaluate.dtype]}}


def make_plan(cfg: Config, shape: Shape, free: int | None = None, n_tasks: int | None = None,
              throughput: dict | None = None) -> dict:
    """The plan of a configuration (see the module docstring for every formula); `throughput`: measured
    figures (`load_throughput`) instead of the assumed ones."""
    p, e, t = cfg.pipeline, cfg.extract, cfg.train
    C, D, L = len(p.revisions) or p.n_checkpoints, shape.d_model, t.crosscoder.n_latents
    n_seq, seq_len = e.corpus.n_sequences or 0, e.corpus.seq_len
    tokens = n_seq * (seq_len - 1 if e.corpus.drop_first_position else seq_len)
    activation_bytes = tokens * C * D * BYTES[e.storage_dtype]
    mode = e.mode if e.mode != "auto" else \
        ("parquet" if activation_bytes <= e.max_disk_gb * 1e9 else "stream")
    cc_params = 2 * L * C * D + C * D + L
    n_tasks = n_tasks if n_tasks is not None else len(p.tasks)
    k = cfg.analysis.context_k
    tables = TABLE_ROW_BYTES * (L * C * max(1, n_tasks) + L * (C + 1) * k * 2)
    train_checkpoints = 4 * 12 * cc_params
    disk = {"activations": activation_bytes if mode == "parquet" else 0,
            "train_checkpoints": train_checkpoints,
            "tables": tables}
    prefix = p.layer * shape.block_params()
    rows = max(1, t.batch_size // cfg.launch.workers)
    peak_actor = C * (prefix + shape.vocab * D) * BYTES[e.compute_dtype] + \
        e.batch_sequences * seq_len * D * (4 * C + 32)
    buffer = t.shuffle_buffer_rows * C * D * 4 if mode == "stream" else rows * C * D * 4
    peak_worker = 16 * cc_params + rows * (12 * C * D + 8 * L) + buffer
    model_params = shape.n_layers * shape.block_params() + 2 * shape.vocab * D
    flops = {"extract": 2 * prefix * tokens * C, "train": 6 * cc_params * t.n_steps * t.batch_size,
             "evaluate": 4 * model_params * C * cfg.evaluate.eval_sequences * seq_len}
    rate = rates(cfg, throughput)
    gpu_hours = {s: f / rate["flops_per_s"][s] / 3600 for s, f in flops.items()}
    gpus = {"extract": max(1, cfg.launch.actors), "train": max(1, cfg.launch.workers),
            "evaluate": 1}
    plan = {"tokens": tokens, "n_checkpoints": C, "d_model": D, "n_latents": L,
            "activation_bytes": activation_bytes, "mode": mode, "disk_bytes": sum(disk.values()),
            "corpus_bytes": (n_seq + cfg.evaluate.eval_sequences) * seq_len * 4,
            "disk": disk, "crosscoder_params": cc_params, "peak_bytes_per_actor": peak_actor,
            "peak_bytes_per_worker": peak_worker, "buffer_bytes_per_worker": buffer, "flops": flops,
            "gpu_hours": sum(gpu_hours.values()), "gpu_hours_by_stage": gpu_hours, "throughput": rate,
            "wall_hours": sum(h / gpus[s] for s, h in gpu_hours.items()),
            "free_bytes": free, "fits": free is None or sum(disk.values()) <= free}
    return plan


def plan_for(cfg: Config, throughput: dict | None = None) -> dict:
    """The plan of a configuration (a study's: `study_plan`), with the free space at its output folder;
    `throughput`: measured figures (`load_throughput`) instead of the assumed ones."""
    from crossray.store import run_folder  # (torch: not for the rest of the plan)

    p = cfg.pipeline
    shape = model_shape(p.family, (list(p.revisions) or list(p.screen_revisions) or [None])[0])
    free = free_bytes(run_folder(p.out, p.name))
    if cfg.study.sets:
        return study_plan(cfg, shape, free, throughput)
    return make_plan(cfg, shape, free, throughput=throughput)


def check_fits(plan: dict, out: str | Path) -> None:
    """Refuse a Parquet plan that does not fit the free space at its output path."""
    if plan["mode"] == "parquet" and not plan["fits"]:
        raise ValueError(f"this configuration writes {human(plan['disk_bytes'])} "
                         f"({human(plan['disk']['activations'])} of activation shards) but {out} has "
                         f"{human(plan['free_bytes'])} free: set extract.mode: stream, or free space")


def human(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"


def plan_text(plan: dict) -> str:
    """The plan as a few lines a person reads at the start of a run."""
    if plan.get("study"):
        return study_plan_text(plan)
    d = plan["disk"]
    return "\n".join([
        f"plan: {plan['tokens']:,} tokens x {plan['n_checkpoints']} checkpoints x d_model {plan['d_model']}: "
        f"{human(plan['activation_bytes'])} of activations if materialised; mode {plan['mode']}",
        f"  disk: {human(plan['disk_bytes'])} (activations {human(d['activations'])}, training checkpoints "
        f"{human(d['train_checkpoints'])}, tables {human(d['tables'])}); free at the output: "
        f"{human(plan['free_bytes'])}",
        f"  peak memory: {human(plan['peak_bytes_per_actor'])} per extraction actor, "
        f"{human(plan['peak_bytes_per_worker'])} per Train worker; the corpus's tokens "
        f"{human(plan['corpus_bytes'])} in Ray's object store",
        f"  compute: {plan['gpu_hours']:.3g} GPU hours {_on(plan)} (extract "
        f"{plan['gpu_hours_by_stage']['extract']:.3g}, train {plan['gpu_hours_by_stage']['train']:.3g}), "
        f"about {plan['wall_hours']:.3g} h on the configured GPUs"])


def _on(plan: dict) -> str:
    """Where a plan's GPU hours come from, in words."""
    t = plan["throughput"]
    if t["source"] == "assumed":
        return (f"on H100s (assumed: {H100_BF16 / 1e12:.0f} TFLOP/s bf16 at MFU {MFU['extract']} for "
                f"extraction, {MFU['train']} of half that for training)")
    return f"on {t['device']} (measured throughputs from {t['source']})"


def study_plan(cfg: Config, shape: Shape, free: int | None = None, throughput: dict | None = None) -> dict:
    """A study's plan: the union extraction once, then every set's training and evaluation; beside it
    what the sets would cost run apart (each extracting its own revisions)."""
    from crossray.study import planned_sets, union_config

    union = make_plan(union_config(cfg), shape, free, throughput=throughput)
    sets = {}
    for s in planned_sets(cfg):  # each set's own config: its overrides (n_latents, ...) counted
        p = dataclasses.replace(s.config.pipeline, revisions=(), n_checkpoints=len(s.revisions))
        sets[s.name] = make_plan(dataclasses.replace(s.config, pipeline=p), shape, throughput=throughput)
        sets[s.name]["revisions"] = list(s.revisions)
    hours = {"extract": union["gpu_hours_by_stage"]["extract"],
             "train": sum(s["gpu_hours_by_stage"]["train"] for s in sets.values()),
             "evaluate": sum(s["gpu_hours_by_stage"]["evaluate"] for s in sets.values())}
    apart = sum(s["gpu_hours"] for s in sets.values())
    gpus = {"extract": max(1, cfg.launch.actors), "train": max(1, cfg.launch.workers), "evaluate": 1}
    disk = {"activations": union["disk"]["activations"],
            "train_checkpoints": sum(s["disk"]["train_checkpoints"] for s in sets.values()),
            "tables": sum(s["disk"]["tables"] for s in sets.values())}
    return {"study": True, "mode": union["mode"], "tokens": union["tokens"], "d_model": union["d_model"],
            "n_sets": len(sets), "revisions": union["n_checkpoints"],
            "revision_passes": union["n_checkpoints"],
            "revision_passes_apart": sum(s["n_checkpoints"] for s in sets.values()),
            "disk": disk, "disk_bytes": sum(disk.values()), "free_bytes": free,
            "fits": free is None or sum(disk.values()) <= free,
            "peak_bytes_per_actor": union["peak_bytes_per_actor"],
            # the Train workers hold every set's crosscoder and step, and one buffer of the union's rows
            "peak_bytes_per_worker": sum(s["peak_bytes_per_worker"] - s["buffer_bytes_per_worker"]
                                         for s in sets.values()) + union["buffer_bytes_per_worker"],
            "gpu_hours": sum(hours.values()), "gpu_hours_by_stage": hours, "gpu_hours_apart": apart,
            "wall_hours": sum(h / gpus[s] for s, h in hours.items()), "throughput": union["throughput"],
            "union": union, "sets": sets}


def study_plan_text(plan: dict) -> str:
    lines = [f"study plan: {plan['n_sets']} sets over {plan['revisions']} revisions, {plan['tokens']:,} "
             f"tokens each; extraction: {plan['revision_passes']} revision-passes (the sets apart: "
             f"{plan['revision_passes_apart']}); mode {plan['mode']}",
             f"  disk: {human(plan['disk_bytes'])}; free at the output: {human(plan['free_bytes'])}",
             f"  peak memory: {human(plan['peak_bytes_per_actor'])} per extraction actor, "
             f"{human(plan['peak_bytes_per_worker'])} per Train worker",
             f"  compute: {plan['gpu_hours']:.3g} GPU hours {_on(plan)} (the sets apart: "
             f"{plan['gpu_hours_apart']:.3g}), about {plan['wall_hours']:.3g} h on the configured GPUs"]
    for name, s in plan["sets"].items():
        lines.append(f"  set {name}: {s['n_checkpoints']} checkpoints, train "
                     f"{s['gpu_hours_by_stage']['train']:.3g} GPU h, {human(s['peak_bytes_per_worker'])} per "
                     f"Train worker, {human(s['disk']['train_checkpoints'])} of Train checkpoints")
    return "\n".join(lines)
