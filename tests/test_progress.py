"""Progress without a terminal: periodic log lines with rates and ETA while the work runs, and the
same figures handed to a report callback (what goes to MLflow)."""

import logging
import time

import pytest
import torch

from crossray.config import CrosscoderSettings, TrainSettings, resolve_train
from crossray.models.crosscoder import Crosscoder
from crossray.progress import Progress
from crossray.train import Trainer


def test_log_lines_carry_rate_and_eta_while_running(caplog):
    seen = []
    progress = Progress("extract", 10, "tokens", every_s=0.05, terminal=False, report=seen.append)
    with caplog.at_level(logging.INFO, "crossray.progress"):
        for _ in range(5):
            time.sleep(0.06)
            progress.update(1, sequences=2)
        progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) >= 5 and lines[0].startswith("extract: 1/10 tokens (10%), ")
    assert "tokens/s" in lines[0] and "sequences/s" in lines[0] and "ETA" in lines[0]
    assert seen[0]["done"] == 1 and seen[0]["tokens_per_s"] == pytest.approx(1 / 0.06, rel=0.5)
    assert seen[-1]["done"] == 5


def test_training_without_a_terminal_logs_progress_lines_with_a_rate(caplog, monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    cfg = resolve_train(TrainSettings(crosscoder=CrosscoderSettings(n_latents=32), n_steps=40, batch_size=64,
                                      metrics_every=5), 2, 8)
    trainer = Trainer(Crosscoder(cfg.crosscoder), cfg, torch.device("cpu"))

    def batches():
        while True:
            time.sleep(0.01)  # about 25 steps/s: several 0.1 s ticks during the run
            yield torch.randn(64, 2, 8)

    reports = []
    with caplog.at_level(logging.INFO, "crossray.progress"):
        trainer.fit(batches(), report=reports.append, every_s=0.1)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train: ")]
    during = [line for line in lines if "(100%)" not in line]
    assert len(during) >= 2, lines  # while it ran, not only at the end
    assert all("steps/s" in line and "tokens/s" in line and "ETA" in line for line in lines)
    assert "loss" in lines[-1] and "fve" in lines[-1] and "l0" in lines[-1]
    assert reports[-1]["done"] == 40 and reports[-1]["tokens_per_s"] > reports[-1]["steps_per_s"]



def test_slow_work_shows_its_rate_per_minute():
    from crossray.progress import describe

    snap = {"done": 2, "total": 4, "sets_per_s": 1 / 90, "eta_s": 180.0}
    assert "0.67 sets/min" in describe("study", "sets", snap, [], []) and "ETA 3 min" in \
        describe("study", "sets", snap, [], [])
