"""Live queries on a finished run: IE/RelIE and ablations for minimal pairs, feature activations of a
text, for input the pipeline never saw.

`LiveRun` holds one run's crosscoder and every checkpoint of its set, truncated as attribution needs,
and answers with the attribution library itself (`crossray.attribution`), with the settings the run's
attribute stage used (`attribute/effects/summary.json`): sending a task's examples reproduces its
stored effects. Query bodies are plain dicts (validated by the API); answers are JSON-ready dicts, and
a query the input makes impossible answers `{"error": kind, "detail": reason}` instead of raising,
so the answer crosses a Serve handle intact; the kinds (`crossray.errors.ERROR_KINDS`) say what went
wrong, not which HTTP status that is (the Serve app maps them).

Bounds: a query may carry `limits` (`{"chars", "tokens", "deadline"}`, set by the API from its
`LiveLimits`): every pair is checked (`tasks.check_request_rows`, `check_request_tokens`) before a
model runs, and an /effects query past its `deadline` (epoch seconds) stops between model batches.

Batching: `effects` takes many queries at once and runs their examples through the same model
batches (examples are independent; each query's sums are gathered back by index), so a replica under
load does one suffix pass per `batch_size` examples instead of one per request.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from crossray import analysis as A
from crossray import attribution as AT
from crossray.checkpoints import Family, resolve_family
from crossray.config import AttributionConfig
from crossray.errors import query_error
from crossray.models.layer import encode, load_layer_model, load_tokenizer
from crossray.pipeline.inputs import weight_hashes
from crossray.results import nums
from crossray.store import RunLayout, load_crosscoder
from crossray.tasks import (
    MAX_FIELD_CHARS,
    MAX_REQUEST_TOKENS,
    Task,
    TaskError,
    check_request_rows,
    check_request_tokens,
    rows_to_task,
)

logger = logging.getLogger(__name__)


def run_family(folder: Path, family_name: str) -> Family:
    """The family a run was extracted from: its `config.json` (family spec, naming, tokenizer), or for a
    run written before that file existed, the family name the crosscoder recorded."""
    path = folder / "config.json"
    if path.exists():
        p = json.loads(path.read_text())["pipeline"]
        return resolve_family(p["family"], naming=p.get("naming"), tokenizer=p.get("tokenizer"))
    return resolve_family(family_name)


class LiveRun:
    """One run's crosscoder and checkpoints, loaded once; answers live queries."""

    def __init__(self, run_id: str, folder: str | Path, device: str = "cpu", check_weights: bool = True,
                 model_batch: int = 32):
        folder = Path(folder)
        self.id, self.model_batch = run_id, model_batch
        layout = RunLayout(folder)
        self.cc = load_crosscoder(layout.crosscoder, device).eval().requires_grad_(False)
        self.folded = self.cc.fold().eval().requires_grad_(False)
        cfg = self.cc.cfg
        self.revisions, self.layer = list(cfg.revisions), cfg.layer
        summary = json.loads(layout.summary.read_text())
        fields = {f.name for f in dataclasses.fields(AttributionConfig)}
        self.attribution = AttributionConfig(**{k: v for k, v in summary["config"].items() if k in fields})
        family = run_family(folder, cfg.family)
        if check_weights and cfg.weight_hashes and \
                list(weight_hashes(family, self.revisions)) != list(cfg.weight_hashes):
            raise ValueError(f"run {run_id}: the checkpoints of {family.name} here are not the ones the "
                             f"crosscoder was trained on (weight hashes differ)")
        self.tokenizer = load_tokenizer(family, self.revisions[0])
        self.models = [load_layer_model(family, r, self.layer, dtype=self.attribution.dtype, device=device)
                       for r in self.revisions]
        AT.check_crosscoder_fits(self.cc, self.models, self.revisions)
        self.trajectory = A.trajectory_classes(self.cc.decoder_norms().detach().cpu())
        logger.info("live run %s: %d checkpoints of %s at layer %d on %s", run_id, len(self.models),
                    family.name, self.layer, device)

    # -- input -------------------------------------------------------------------------------------
    def task(self, rows: list[dict], limits: dict | None = None) -> Task:
        """Request rows in any task format the project reads, with the single-token rule, each checked
        against `limits` (`chars` per field, `tokens` per request) first."""
        if not rows:
            raise TaskError("pairs is empty")
        limits = limits or {}
        try:
            check_request_rows(rows, limits.get("chars", MAX_FIELD_CHARS))
            check_request_tokens(rows, self.tokenizer, limits.get("tokens", MAX_REQUEST_TOKENS))
        except (KeyError, TypeError, AttributeError) as e:
            raise TaskError(f"pairs: malformed row ({type(e).__name__}: {e})") from e
        try:
            task = rows_to_task(rows, self.tokenizer, "request", "pairs")
        except (KeyError, TypeError, AttributeError) as e:
            raise TaskError(f"pairs: malformed row ({type(e).__name__}: {e})") from e
        if not task.examples:
            raise TaskError(f"no pair is usable: skipped {dict(task.skipped)} (answers must be single "
                            "tokens of this model's tokenizer)")
        return task

    def checkpoint(self, value: str | int | None) -> list[int]:
        if value is None:
            return list(range(len(self.revisions)))
        if isinstance(value, str) and value in self.revisions:
            return [self.revisions.index(value)]
        try:
            i = int(value)
        except (TypeError, ValueError):
            i = None
        if i is not None and -len(self.revisions) <= i < len(self.revisions):
            return [i % len(self.revisions)]
        raise LookupError(f"unknown checkpoint {value!r}: the run has {self.revisions}")

    def _features(self, ids: Sequence[int]) -> list[int]:
        L = self.cc.cfg.n_latents
        bad = [i for i in ids if not 0 <= i < L]
        if bad:
            raise LookupError(f"unknown feature(s) {bad[:10]}: the run has features 0..{L - 1}")
        return list(dict.fromkeys(ids))

    # -- effects -----------------------------------------------------------------------------------
    def effects(self, queries: Sequence[dict]) -> list[dict]:
        """Mean IE per feature and checkpoint over each query's pairs, computed like the attribute stage
        computes a task's (its steps, threshold, baseline rule and positions), many queries at once."""
        answers: list[dict | None] = [None] * len(queries)
        prepared: dict[tuple, list] = {}
        for q, query in enumerate(queries):
            try:
                task = self.task(query["pairs"], query.get("limits"))
                self._features(query.get("features") or [])
                steps = query.get("steps") or self.attribution.steps
                cfg = dataclasses.replace(self.attribution, steps=steps)
                baseline = AT.task_baseline(task, self.tokenizer, cfg)
            except TaskError as e:
                answers[q] = query_error(str(e))
                continue
            except LookupError as e:
                answers[q] = query_error(str(e), "not_found")
                continue
            run_cfg = AT.for_task(cfg, baseline)
            key = (run_cfg.steps, baseline) if baseline != "mixed" else (run_cfg.steps, baseline, q)
            prepared.setdefault(key, []).append((q, task, run_cfg, baseline))
        for items in prepared.values():
            deadlines = [(queries[q].get("limits") or {}).get("deadline", math.inf) for q, *_ in items]
            sums = self._effect_sums([task for _, task, _, _ in items], items[0][2], deadlines)
            for (q, task, cfg, baseline), s in zip(items, sums, strict=True):
                answers[q] = self._effects_answer(queries[q], task, s, cfg, baseline) if s is not None else \
                    query_error("the query passed its deadline before its model work was done; send fewer "
                                "pairs or steps, or retry when the service is less busy", "unavailable")
        return answers  # type: ignore[return-value]

    def _effect_sums(self, tasks: list[Task], cfg: AttributionConfig, deadlines: list[float]
                     ) -> list[AT.EffectSums | None]:
        """Each task's effect sums, their examples run through shared batches of `model_batch` examples
        (not the stage's `batch_size`, sized for a task's long sweep: a live batch gathers a few pairs
        from each of many requests, and one suffix pass over more rows costs little more). A task whose
        deadline passes stops there (None): its remaining examples leave the next batches."""
        owned = [(t, e) for t, task in enumerate(tasks) for e in task.examples]
        C, L, T = len(self.models), self.cc.cfg.n_latents, len(tasks)
        ie_TCL, err_TC, met_TC = torch.zeros(T, C, L), torch.zeros(T, C), torch.zeros(T, C)
        late: set[int] = set()
        while owned:
            now = time.time()
            late.update(t for t in {t for t, _ in owned} if deadlines[t] <= now)  # done ones are kept
            owned = [(t, e) for t, e in owned if t not in late]
            batch, owned = owned[:self.model_batch], owned[self.model_batch:]
            if not batch:
                break
            ie_CBL, err_CB, met_CB = AT.example_effects(self.folded, self.models, self.tokenizer,
                                                        [e for _, e in batch], cfg)
            who = torch.tensor([t for t, _ in batch])
            ie_TCL.index_add_(0, who, ie_CBL.transpose(0, 1))
            err_TC.index_add_(0, who, err_CB.T)
            met_TC.index_add_(0, who, met_CB.T)
        return [AT.EffectSums(ie_TCL[t], err_TC[t], met_TC[t], len(task.examples)) if t not in late else None
                for t, task in enumerate(tasks)]

    def _effects_answer(self, query: dict, task: Task, sums: AT.EffectSums, cfg: AttributionConfig,
                        baseline: str) -> dict:
        ie_CL, err_C, met_C = sums.means()
        if query.get("features"):
            ids = self._features(query["features"])
        else:
            score_L = ie_CL.abs().amax(0)
            n = min(int(query.get("top") or 20), int((score_L > 0).sum()))
            ids = score_L.topk(n).indices.tolist() if n else []
        ie_FC = ie_CL[:, ids].T
        shares = A.one_vs_all(ie_FC).share_LC
        groups = A.group_labels(shares, self.revisions, cfg.low, cfg.high)
        # tolist: element by element, a tensor costs microseconds per value (a third of a small
        # query's answer time)
        return {"checkpoints": self.revisions, "examples": sums.n_examples, "skipped": dict(task.skipped),
                "steps": cfg.steps, "baseline": baseline,
                "logit_diff": nums((-met_C).tolist()), "error_ie": nums(err_C.tolist()),
                "features": [{"feature": i, "ie": nums(ie), "relie": nums(share), "group": group,
                              "trajectory": self.trajectory[i]}
                             for i, ie, share, group in zip(ids, ie_FC.tolist(), shares.tolist(), groups,
                                                            strict=True)]}

    # -- ablation ----------------------------------------------------------------------------------
    def ablate(self, query: dict) -> dict:
        """Logit difference (correct minus wrong) and accuracy before and after zero-ablating the
        features together at each asked checkpoint, and each feature's own delta (the attribute
        stage's ablation check, `attribution.ablation_deltas`)."""
        try:
            task = self.task(query["pairs"], query.get("limits"))
            feats = self._features(query["features"])
            cks = self.checkpoint(query.get("checkpoint"))
        except TaskError as e:
            return query_error(str(e))
        except LookupError as e:
            return query_error(str(e), "not_found")
        sets = [feats] + ([[i] for i in feats] if len(feats) > 1 else [])
        diffs = AT.ablated_logit_diffs(self.folded, self.models, self.tokenizer, task.examples, sets, cks,
                                       self.attribution.skip_first_position)  # batches as the stage's
        alone = diffs[2:] if len(feats) > 1 else diffs[1:]

        def state(d_CN: torch.Tensor) -> list[dict]:
            return [{"logit_diff": float(d_CN[c].mean()), "accuracy": float((d_CN[c] > 0).float().mean())}
                    for c in cks]

        return {"checkpoints": [self.revisions[c] for c in cks], "examples": len(task.examples),
                "skipped": dict(task.skipped), "features": feats, "before": state(diffs[0]),
                "after": state(diffs[1]),
                "per_feature": [{"feature": i, "delta": [float((diffs[0, c] - alone[f, c]).mean())
                                                         for c in cks]} for f, i in enumerate(feats)]}

    # -- activations -------------------------------------------------------------------------------
    @torch.no_grad()
    def activations(self, query: dict) -> dict:
        """The text's tokens and, at each, the top features by joint activation (positive only) and by
        each checkpoint's encoder contribution x_c @ W_enc[c] (the views of the stored top contexts)."""
        ids = encode(self.tokenizer, query["text"])
        if not ids:
            return query_error("text has no tokens")
        top = int(query.get("top") or 5)
        device = next(self.models[0].model.parameters()).device
        input_ids, mask = torch.tensor([ids], device=device), torch.ones(1, len(ids), dtype=torch.long,
                                                                          device=device)
        x_SCD = torch.stack([m.resid_pre(input_ids, mask)[0].float() for m in self.models], dim=1)
        x = self.cc.normalise(x_SCD)
        joint_SL = self.cc.encode(x, mode="eval")
        per_CSL = A.checkpoint_contributions(self.cc.W_enc_CDL, x)

        def best(row_L: torch.Tensor, positive: bool) -> list[dict]:
            values, idx = row_L.topk(min(top, row_L.numel()))
            return [{"feature": int(i), "value": float(v)} for v, i in zip(values.tolist(), idx.tolist(),
                                                                           strict=True)
                    if (v > 0 or not positive) and math.isfinite(v)]

        tokens = [{"token": self.tokenizer.decode([t], clean_up_tokenization_spaces=False), "id": t,
                   "joint": best(joint_SL[s], True),
                   "checkpoints": [best(per_CSL[c, s], False) for c in range(len(self.revisions))]}
                  for s, t in enumerate(ids)]
        return {"checkpoints": self.revisions, "tokens": tokens}


def open_runs(source: str, cache_dir: str | Path, device: str = "cpu") -> list[LiveRun]:
    """`open_run`, or for a study folder every finished set (ids `<study>.<set>`, as the tables)."""
    from crossray.results import is_study_folder, load_study

    if not is_study_folder(source):
        return [open_run(source, cache_dir, device)]
    study, runs = load_study(source)
    layout = RunLayout(source)
    return [LiveRun(run.id, layout.set_root(run.id.removeprefix(f"{study.name}.")), device) for run in runs]


def open_run(source: str, cache_dir: str | Path, device: str = "cpu") -> LiveRun:
    """A run for live queries from its pipeline folder, MLflow run id or `models:/` reference (the
    crosscoder's weights are downloaded into the cache the table queries use)."""
    from crossray.results import ResultsError, mlflow_folder

    if Path(source).is_dir():
        folder, run_id = Path(source), Path(source).name
    elif source.startswith("models:/") or len(source) == 32:
        folder, parent = mlflow_folder(source, cache_dir, weights=True)
        run_id = parent.info.run_id
    else:
        raise ResultsError(f"{source!r} is neither a pipeline folder, an MLflow run id nor a models:/ URI")
    return LiveRun(run_id, folder, device)
