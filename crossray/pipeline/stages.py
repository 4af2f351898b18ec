"""The stages' results and the library work inside them: typed inputs in, a typed result out, no Ray.

Each result is a frozen dataclass of plain values, written to the stage's `done` file and read back
when the stage is reused; `RunOutcome` holds one per stage. The functions that need the models
(`screen_revision`, `evaluate`, `top_contexts`) run wherever the caller puts them, on the `device` it
hands them (in a Ray task, the one `rayenv.compute_device` gives it: its GPU, else the CPU;
`jobs/pipeline.py`): every model and crosscoder they load goes there. The stages themselves, and their
keys, are in `graph`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from crossray.attribution import TaskSummary
from crossray.checkpoints import Family
from crossray.config import AnalysisConfig, EvaluateConfig, ExtractConfig
from crossray.errors import InputError
from crossray.store import CONTEXTS, FEATURES, STAGES, RunLayout, column

logger = logging.getLogger(__name__)

ExtractMode = Literal["stream", "parquet"]
"""parquet: shards on disk that training reads; stream: extraction feeds training, nothing on disk."""


@dataclass(frozen=True)
class ScreenResult:
    """Accuracy and activation similarity of every screened revision."""

    revisions: list[str]
    accuracy: dict[str, list[float]]
    """The curves selection reads, per task, one value per screened revision: full-sentence accuracy
    (lm-eval's BLiMP comparison, the paper's curves) where the task has sentence pairs, prefix accuracy
    where it has none."""
    similarity: list[list[float]]
    """Mean per-token activation cosine between every pair of screened revisions."""
    prefix_accuracy: dict[str, list[float]] = field(default_factory=dict)
    """Prefix accuracy per task (the single-token comparison IE measures), beside the curves."""


@dataclass(frozen=True)
class SelectResult:
    """The checkpoint set and why it was chosen."""

    revisions: list[str]
    reasons: list[str]


@dataclass(frozen=True)
class ExtractResult:
    """Where the activations are, and what the manifest says of them."""

    acts: str | None
    """Folder of the Parquet shards and manifest; None in stream mode."""
    manifest_key: str
    weight_hashes: list[str]
    corpus_hash: str
    norm_factors: list[float]
    d_model: int
    n_sequences: int
    token_count: int
    mode: ExtractMode = "parquet"
    """parquet (shards in `acts`) or stream (nothing on disk: training read the extraction stream)."""
    norm_factors_by_policy: dict[str, list[float]] = field(default_factory=dict)
    """The factors under both position-0 policies (`norm_factors` is the one that scaled)."""


@dataclass(frozen=True)
class TrainResult:
    """The trained crosscoder and the last metrics row of its training."""

    crosscoder: str
    """Folder of the final crosscoder (weights, config, training state)."""
    final: dict
    model_uri: str = ""
    """The crosscoder as an MLflow pyfunc model (`models:/m-...`)."""


@dataclass(frozen=True)
class EvaluateResult:
    """Held-out metrics of the crosscoder."""

    metrics: dict[str, float]
    """fve, l0, dead, and fve/<revision>, delta_ce/<revision>, ce_recovered/<revision>, ..."""


@dataclass(frozen=True)
class AttributeResult:
    """The effects tables and each task's summary."""

    effects: str
    """Folder of effects.parquet/.csv and summary.json."""
    tasks: dict[str, TaskSummary]
    """Per task: examples, skipped, metric, error effect, selected features, ablation check."""


@dataclass(frozen=True)
class AnalyseResult:
    """How many features fall in each group, by decoder norm and, per task, by RelIE."""

    groups_by_reldec: dict[str, int]
    groups_by_relie: dict[str, dict[str, int]]


@dataclass
class RunOutcome:
    """What a pipeline run produced: every stage's result (None until it ran or was reused), how each
    stage went, the MLflow handles."""

    name: str
    family: Family
    layer: int
    screen: ScreenResult | None = None
    select: SelectResult | None = None
    extract: ExtractResult | None = None
    train: TrainResult | None = None
    evaluate: EvaluateResult | None = None
    attribute: AttributeResult | None = None
    analyse: AnalyseResult | None = None
    status: dict[str, str] = field(default_factory=dict)
    """Per stage: "ran" or "reused"."""
    devices: dict[str, str] = field(default_factory=dict)
    """Per stage: the device its work ran on ("cuda" or "cpu"; a reused stage: when it ran)."""
    keys: dict[str, str] = field(default_factory=dict)
    mlflow_run_id: str = ""
    registered: dict | None = None
    method: str = "crossray"
    """`pipeline.method`: which forms of ΔCE and the ablation rho are the headline."""

    def set(self, stage: str, result: Any, status: str) -> None:
        if not isinstance(result, RESULTS[stage]):
            raise TypeError(f"stage {stage} produced a {type(result).__name__}, not a "
                            f"{RESULTS[stage].__name__}")
        setattr(self, stage, result)
        self.status[stage] = status


RESULTS = {"screen": ScreenResult, "select": SelectResult, "extract": ExtractResult, "train": TrainResult,
           "evaluate": EvaluateResult, "attribute": AttributeResult, "analyse": AnalyseResult}
assert tuple(RESULTS) == STAGES


def to_json(result) -> dict:
    if isinstance(result, AttributeResult):
        return {"effects": result.effects, "tasks": {t: s.to_json() for t, s in result.tasks.items()}}
    return dataclasses.asdict(result)


def from_json(stage: str, data: dict):
    """A result as `to_json` wrote it (extractions of earlier versions wrote "" for no shards)."""
    if stage == "attribute":
        tasks = {t: TaskSummary.from_json(info) for t, info in data["tasks"].items()}
        return AttributeResult(data["effects"], tasks)
    if stage == "extract" and data.get("acts") == "":
        data = {**data, "acts": None}
    return RESULTS[stage](**data)


# -- screen ---------------------------------------------------------------------------------------

def screen_texts(family: Family, revision: str, task_specs: Sequence[str], n_examples: int) -> list[str]:
    """The task sentences (clean prefix + clean answer) the activation-similarity screen runs."""
    from crossray.models.layer import load_tokenizer
    from crossray.tasks import load_tasks

    tokenizer = load_tokenizer(family, revision)
    return [e.clean_prefix + e.clean_answer for t in load_tasks(list(task_specs), tokenizer)
            for e in t.examples[:n_examples]]


def screen_revision(family: Family, task_specs: Sequence[str], revision: str, layer: int,
                    texts: Sequence[str], dtype: str = "float32", *, device: str
                    ) -> tuple[list[dict], torch.Tensor]:
    """One revision's accuracy rows and its unit-normalised activations on the texts (models in `dtype`
    on `device`)."""
    from crossray.accuracy import accuracy_curves
    from crossray.models.layer import load_tokenizer
    from crossray.screen import revision_activations

    rows = accuracy_curves(family, list(task_specs), [revision], dtype=dtype, device=device)[0]
    tokenizer = load_tokenizer(family, revision)
    return rows, revision_activations(family, revision, layer, tokenizer, texts, dtype=dtype, device=device)


def combine_screen(revisions: Sequence[str], parts: Sequence[tuple[list[dict], torch.Tensor]]
                   ) -> tuple[ScreenResult, list[dict]]:
    from crossray.screen import similarity_matrix

    rows = [r for part, _ in parts for r in part]
    accuracy: dict[str, list[float]] = {}
    prefix: dict[str, list[float]] = {}
    for r in rows:
        accuracy.setdefault(r["task"], []).append(r["sentence_accuracy"] if r["n_sentence"] else
                                                  r["prefix_accuracy"])
        prefix.setdefault(r["task"], []).append(r["prefix_accuracy"])
    sim = similarity_matrix([acts for _, acts in parts])
    return ScreenResult(list(revisions), accuracy, sim.tolist(), prefix), rows


def select(screen: ScreenResult, n_checkpoints: int, pinned: Sequence[str] = (),
           hashes: Sequence[str] | None = None) -> SelectResult:
    """The checkpoint set from the screen's curves (or the `pinned` revisions); `hashes` (one per
    screened revision) let revisions with identical weights count once."""
    from crossray.screen import select_checkpoints

    sel = select_checkpoints(screen.revisions, screen.accuracy, torch.tensor(screen.similarity),
                             n_checkpoints, list(pinned) or None, hashes)
    return SelectResult(list(sel.revisions), list(sel.reasons))


# -- evaluate -------------------------------------------------------------------------------------

def evaluate(ecfg: ExtractConfig, crosscoder_dir: str, held_out_NS: np.ndarray, cfg: EvaluateConfig, *,
             device: str) -> EvaluateResult:
    """FVE, L0, dead latents and spliced ΔCE / CE recovered on `held_out_NS`, the sequences after the
    training ones: `delta_ce/<rev>` with position 0 left real (the training convention),
    `delta_ce_pos0/<rev>` with it spliced too (the paper's evaluation). The checkpoints run with
    `cfg.dtype` weights (fp32 by default, under bf16 autocast on a GPU, as the paper's forward passes
    ran), whatever the extraction ran in; checkpoints and crosscoder on `device`."""
    from crossray.extract import CheckpointSetExtractor
    from crossray.metrics import evaluate as evaluate_rows
    from crossray.metrics import spliced_ce_policies
    from crossray.store import load_crosscoder

    if len(held_out_NS) == 0:
        raise InputError(f"corpus {ecfg.corpus.label} has no sequence left after the training ones for "
                         f"evaluation (evaluate.eval_sequences {cfg.eval_sequences})")
    held_out = torch.from_numpy(np.asarray(held_out_NS)).long()
    extractor = CheckpointSetExtractor(dataclasses.replace(ecfg, compute_dtype=cfg.dtype), device)
    start = 1 if ecfg.corpus.drop_first_position else 0
    cc = load_crosscoder(crosscoder_dir, device)

    def rows():  # a few sequences at a time: 240 x 1024 x C x D floats would not fit in memory
        for chunk in held_out.split(ecfg.batch_sequences):
            acts = extractor(chunk)  # (n, S, C, D)
            yield acts[:, start:].reshape(-1, *acts.shape[2:])

    metrics = evaluate_rows(cc, rows())
    # fp32 weights run under bf16 autocast on a GPU (the extractor does the same for the rows above)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=extractor.device.type == "cuda"
                        and cfg.dtype == "float32"):
        skipped, kept = spliced_ce_policies(cc, extractor.models, held_out, (True, False),
                                            ecfg.batch_sequences)
    for c, rev in enumerate(ecfg.revisions):  # position 0 left real (training's view), and spliced too
        for suffix, ce in (("", skipped), ("_pos0", kept)):
            metrics[column(f"delta_ce{suffix}", rev)] = float(ce.delta_ce_C[c])
            metrics[column(f"ce_recovered{suffix}", rev)] = float(ce.ce_recovered_C[c])
    return EvaluateResult(metrics)


# -- analyse --------------------------------------------------------------------------------------

def analyse(layout: RunLayout, screen: ScreenResult, select: SelectResult, train: TrainResult,
            attribute: AttributeResult, contexts: list[dict], title: str = "crossray run") -> AnalyseResult:
    """Feature table, plots, the findings report, and feature groups by decoder norm and by RelIE;
    `contexts` are the top contexts (`top_contexts`, computed next to the models)."""
    import pandas as pd

    from crossray import analysis as A
    from crossray import plots
    from crossray.report import top_feature_table, write_report
    from crossray.store import load_crosscoder, write_tables

    cc = load_crosscoder(train.crosscoder)
    revisions = list(cc.cfg.revisions)
    rows = A.feature_rows(cc)
    reldec = torch.tensor([[row[column("reldec", r)] for r in revisions] for row in rows])
    write_tables(layout.analyse_tables, {FEATURES: rows, CONTEXTS: contexts})
    folder = layout.stage("analyse")
    plots.accuracy_curves(screen.revisions, screen.accuracy, revisions, folder / "accuracy_curves.png")
    plots.reldec_histogram(reldec, revisions, folder / "reldec_histogram.png")
    effects = pd.read_parquet(layout.effects)
    counts = {}
    for task, info in attribute.tasks.items():
        selected = info.selected
        if not selected:
            continue
        sub = effects[(effects.task == task) & effects.feature.isin(selected)]
        ie_CF = torch.tensor(sub.pivot(index="checkpoint_index", columns="feature", values="ie").values,
                             dtype=torch.float32)
        share = A.one_vs_all(ie_CF.T).share_LC
        plots.relie_scatter(share, revisions, folder / f"relie_{task}.png")
        top = ie_CF.abs().max(0).values.topk(min(8, ie_CF.shape[1])).indices
        plots.ie_evolution(ie_CF[:, top], [selected[i] for i in top.tolist()], revisions,
                           folder / f"ie_evolution_{task}.png")
        counts[task] = pd.Series(A.group_labels(share, revisions)).value_counts().to_dict()
    tops = {task: top_feature_table(effects, task, info.selected, revisions)
            for task, info in attribute.tasks.items()}
    write_report(layout.report, title, select.reasons, revisions, attribute.tasks, tops,
                 pd.DataFrame(rows), pd.DataFrame(contexts), folder)
    groups = pd.Series([row["group"] for row in rows]).value_counts().to_dict()
    return AnalyseResult(groups, counts)


def top_contexts(crosscoder_dir: str, extract: ExtractResult, ecfg: ExtractConfig, cfg: AnalysisConfig,
                 tokens_NS: np.ndarray, columns: Sequence[int] | None = None, *, device: str) -> list[dict]:
    """Top-activating contexts per feature (joint and per checkpoint) over the first extracted
    sequences (`tokens_NS`), with each window's tokens and scores; the crosscoder (and, in stream mode,
    the checkpoints extracting the sequences again) on `device`."""
    from crossray.analysis import contexts_table, extracted_batches, shard_batches
    from crossray.extract import CheckpointSetExtractor, Manifest, extract_family
    from crossray.models.layer import load_tokenizer
    from crossray.store import load_crosscoder

    cc = load_crosscoder(crosscoder_dir, device)
    tokens = torch.from_numpy(np.asarray(tokens_NS)).long()
    n_seq = len(tokens)
    tokenizer = load_tokenizer(extract_family(ecfg), ecfg.revisions[0])
    if extract.mode == "stream":  # nothing stored: extract the scanned sequences again (twice: 2 passes)
        extractor = CheckpointSetExtractor(ecfg, device)
        batches = functools.partial(extracted_batches, extractor, tokens, ecfg.corpus.drop_first_position)
    else:
        manifest = Manifest.read(extract.acts)
        paths = [p for p, s in zip(manifest.shard_paths(extract.acts), manifest.shards, strict=True)
                 if s["seq_start"] < n_seq]
        batches = functools.partial(shard_batches, paths, n_seq, columns)
    decode = functools.lru_cache(maxsize=None)(lambda t: tokenizer.decode([t]))
    return contexts_table(cc, batches, tokens, decode, cfg.context_k, cfg.context_before, cfg.context_after)
