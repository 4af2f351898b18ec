"""B10: a study's wall time against its sets run one after another as separate `crossray run`s.

    scripts/offline .venv/bin/python bench/b10_study.py [--steps 300] [--sequences 512]

The toy study (configs/tiny-study.yaml: the three adjacent pairs of step64, step128, step256,
step1000 and the triple of the last three), shrunk to the given steps and sequences. Same run of the
benchmark, same machine, each command a fresh process as a user runs it:
- study: `crossray run tiny-study.yaml` (one screening, one extraction of the four revisions, the
  four sets' training, evaluation, attribution and analysis);
- serial: for each set, `crossray run set.yaml` with the set pinned (pipeline.revisions), each in its
  own output folder (each screens, extracts its own revisions and trains).
Target: study <= 0.6 of serial. Also reported: the revision-passes of extraction each way, and each
command's wall time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import emit, machine, parser  # noqa: E402


def configs(folder: Path, steps: int, sequences: int) -> tuple[Path, list[tuple[str, Path]]]:
    """The shrunk study config, and one plain config per set (the set pinned)."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "tiny-study.yaml").read_text())
    cfg["pipeline"]["out"] = str(folder / "study")
    cfg["extract"]["corpus"]["n_sequences"] = sequences
    cfg["extract"]["shard_sequences"] = max(64, sequences // 4)
    cfg["train"].update(n_steps=steps, checkpoint_every=max(1, steps // 2), metrics_every=max(1, steps // 4))
    cfg["attribution"].update(steps=4, top_k=10)
    study = folder / "tiny-study.yaml"
    study.write_text(yaml.safe_dump(cfg))
    from crossray.config import load_config
    from crossray.study import planned_sets

    sets = []
    for name, revisions in ((s.name, s.revisions) for s in planned_sets(load_config(study))):
        one = {**cfg, "study": {"sets": []}}
        one["pipeline"] = {**cfg["pipeline"], "name": name, "revisions": list(revisions),
                           "n_checkpoints": len(revisions), "out": str(folder / "serial" / name)}
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(one))
        sets.append((name, path))
    return study, sets


def crossray_run(config: Path) -> float:
    """Wall seconds of `crossray run CONFIG` in a fresh process (its own local Ray, its own MLflow)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # each its own sqlite
    env["PYTHONPATH"] = str(ROOT)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "run", str(config)], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"crossray run {config} failed:\n{proc.stderr[-3000:]}")
    return wall


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--sequences", type=int, default=512)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        study, sets = configs(Path(tmp), args.steps, args.sequences)
        study_s = crossray_run(study)
        serial = {name: crossray_run(path) for name, path in sets}
    serial_s = sum(serial.values())
    passes = sum(len(name.split("-")) for name, _ in sets)
    emit({"benchmark": "B10 study vs its sets run apart", "machine": machine(),
          "shape": {"sets": [n for n, _ in sets], "steps": args.steps, "sequences": args.sequences,
                    "screened": "every toy revision (12)"},
          "study_s": study_s, "serial_s": serial_s, "serial_by_set_s": serial,
          "ratio": study_s / serial_s, "target": "<= 0.6",
          "revision_passes": {"study": len({r for n, _ in sets for r in n.split("-")}), "serial": passes}},
         args.out)


if __name__ == "__main__":
    main()
