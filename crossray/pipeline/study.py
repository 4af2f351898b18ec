"""A study's run: the shared stages once, each set's stages in its own folder, then the comparison.

    <out>/<study>/screen, select, extract      once for every set (extract: the union of their revisions)
    <out>/<study>/sets/<set>/train ... analyse  each set, as a plain run of it would
    <out>/<study>/study/                       comparison tables, timeline plots and study.html

MLflow: a study parent run holds the shared stages' runs and each set's parent run (its stages under
it); its description is the timeline table and its metrics each set's headline numbers. Every set's
crosscoder is trained by one Ray Train job on one pass over the union extraction (its Parquet shards,
or its stream), each set on its columns of the checkpoint axis; evaluation and the context scan read
a set's own revisions. A set that fails is reported and the others go on; re-running the same
command reuses every finished stage of every set.
"""

from __future__ import annotations

import json
import logging
import shutil

from crossray import study as ST
from crossray.config import Config
from crossray.pipeline import graph as G
from crossray.pipeline import inputs as I
from crossray.pipeline import stages as S
from crossray.pipeline.runner import Pipeline
from crossray.pipeline.stages import RunOutcome
from crossray.pipeline.study_report import StudyOutcome, finish_study
from crossray.store import RunLayout
from crossray.tracking import Tracker
from crossray.train import check_shared

logger = logging.getLogger(__name__)


class Study:
    """Runs `cfg` (with `study.sets`) on `backend`: one screening, one extraction, then every set."""

    def __init__(self, cfg: Config, backend: G.Backend, config_name: str = "",
                 tracking_uri: str | None = None):
        self.cfg, self.backend, self.config_name = cfg, backend, config_name
        self.main = Pipeline(cfg, backend, config_name, tracking_uri)  # the study folder, its shared stages
        self.running: tuple[str, Pipeline] | None = None
        """The set whose stages run now, and its pipeline."""

    @property
    def layout(self):
        return self.main.layout

    @property
    def out(self):
        return self.main.out

    @property
    def current(self) -> str | None:
        """The stage running now, and its set (for error messages)."""
        if self.running is not None and self.running[1].current:
            return f"{self.running[1].current} of set {self.running[0]}"
        return self.main.current

    def validate(self) -> None:
        """The pipeline's checks, and every set's revisions and overrides (pinned revisions: all of it,
        else as far as the first N screened ones tell), before any compute."""
        self.main.validate()
        p, screened = self.cfg.pipeline, list(self.main.resolved.screened)
        sets = ST.resolve_sets(self.cfg, list(p.revisions) or screened[:p.n_checkpoints], screened)
        check_shared({f"study set {s.name}": s.config.train for s in sets})  # trained together

    def run(self) -> StudyOutcome:
        m, cfg = self.main, self.cfg
        r = m.resolved
        m.tracker = t = Tracker(r.experiment, r.layout.local_artifacts, r.tracking_uri)
        hashes = dict(zip(r.screened, I.weight_hashes(r.family, r.screened), strict=True))
        with t.parent(cfg.pipeline.name, m.parent_key(), {"crossray.study": cfg.pipeline.name}) as run_id:
            m.start_parent()
            screened, selected = m.screen_and_select(hashes)
            sets = ST.resolve_sets(cfg, selected.result.revisions, list(r.screened))
            union = ST.union(sets, list(r.screened))
            logger.info("study %s: %d sets over %d revisions (%s), each extracted once", cfg.pipeline.name,
                        len(sets), len(union), ", ".join(union))
            data = m.extract_stage({rev: hashes[rev] for rev in union})
            outcome = StudyOutcome(cfg.pipeline.name, union, m.outcome, mlflow_run_id=run_id)
            trained = self.train_together(sets, data, t.progress_logger(run_id))
            self.run_sets(sets, screened, selected, data, outcome, trained)
            if not outcome.failed:
                shutil.rmtree(m.layout.train_storage, ignore_errors=True)  # every set holds its crosscoder
            finish_study(m.layout, m.family, t, outcome)
        return outcome

    def train_together(self, sets: list[ST.StudySet], data: G.Extracted, progress
                       ) -> dict[str, G.TrainOutput | str]:
        """Every set whose train stage is not done, fitted by one Train job on the study's extraction
        (read, or streamed, once for all of them; each set on its columns): per set, its output or
        why it was set aside. The job is named by the sets' train keys, so a re-run resumes it."""
        m, pending, keys = self.main, {}, []
        for s in sets:
            set_data = data.select(s.revisions)
            key = G.stage_key(G.STAGE["train"], {"data": set_data, "settings": s.config.train})
            done = RunLayout(m.layout.set_root(s.name)).done("train")
            if not (done.exists() and json.loads(done.read_text()).get("key") == key):
                pending[s.name] = (G.train_config(set_data, s.config.train), set_data)
                keys.append(key)
        if not pending:
            return {}
        logger.info("study %s: training %d crosscoders together (%s) on one pass over the data",
                    self.cfg.pipeline.name, len(pending), ", ".join(pending))
        self.main.current = "train"
        outputs, aside = self.backend.train_together(pending, m.layout.train_storage,
                                                     f"train-{I.digest(*sorted(keys))}", data, progress)
        self.main.current = None
        return {**outputs, **aside}

    def run_sets(self, sets: list[ST.StudySet], screened: G.Screened, selected: G.Selected,
                 data: G.Extracted, outcome: StudyOutcome, trained: dict[str, G.TrainOutput | str]) -> None:
        from crossray.progress import Progress

        progress = Progress("study", len(sets), "sets", every_s=0.0)  # a line (done, ETA) per set
        for s in sets:
            outcome.set_revisions[s.name] = list(s.revisions)
            try:
                outcome.sets[s.name] = self.run_set(s, screened, selected, data, trained.get(s.name))
            except Exception as e:  # noqa: BLE001 (a set's failure is reported; the others go on)
                logger.exception("study set %s failed; the other sets go on", s.name)
                first = str(e).splitlines()[0][:300] if str(e) else ""
                outcome.failed[s.name] = f"{type(e).__name__}: {first}"
            progress.update(1)
        self.running = None

    def run_set(self, s: ST.StudySet, screened: G.Screened, selected: G.Selected, data: G.Extracted,
                trained: G.TrainOutput | str | None = None) -> RunOutcome:
        """One set's train ... analyse in its folder, under its own MLflow parent run; `trained`: what
        the study's Train job made of it (its train stage records that), or why it was set aside."""
        m = self.main
        layout = m.layout.link_set(s.name, self.cfg.pipeline.name)
        backend = self.backend if trained is None else Trained(self.backend, trained)
        p = Pipeline(s.config, backend, self.config_name, m.tracking_uri, layout=layout, family=m.family)
        p.tracker = t = m.tracker
        self.running = (s.name, p)
        set_selected = G.Selected(I.digest(selected.key, s.revisions), S.SelectResult(
            list(s.revisions), [f"set {s.name} of study {self.cfg.pipeline.name}"]))
        set_data = data.select(s.revisions)
        o = p.outcome
        for stage, result in (("screen", screened.result), ("select", set_selected.result),
                              ("extract", set_data.result)):
            o.set(stage, result, "shared")
        assert t is not None
        with t.parent(s.name, p.parent_key(), {"crossray.study": self.cfg.pipeline.name}) as o.mlflow_run_id:
            p.start_parent()
            t.set_tags({"crossray.revisions": ",".join(s.revisions),
                        "crossray.manifest": data.result.manifest_key})
            p.set_stages(screened, set_selected, set_data)
            p.finish()
        return o


class Trained:
    """A set's backend whose training the study's joint Train job did: `train` hands over its output
    (or raises why the set was set aside); everything else is the study's backend."""

    def __init__(self, backend: G.Backend, output: G.TrainOutput | str):
        self.backend, self.output = backend, output

    def __getattr__(self, name: str):
        return getattr(self.backend, name)

    def train(self, *args, **kwargs) -> G.TrainOutput:
        if isinstance(self.output, str):
            raise RuntimeError(f"its crosscoder was set aside while training with the others: {self.output}")
        return self.output
