"""The library's commands of the `crossray` command line (no Ray here).

    crossray toy build [--out DIR]                  build (or reuse) the toy model family
    crossray checkpoints check --family F --revisions a,b [--layer L]
    crossray tasks accuracy --family F --task FILE_OR_DIR [--out DIR]
    crossray plan CONFIG [--json] [--section.field VALUE ...]   what a run will cost, before it runs

The installed `crossray` command (`jobs.cli`) adds `run` (the pipeline on Ray) and `serve` (Ray
Serve); `python -m crossray.cli` runs these commands alone. Bad input (a missing revision, a malformed
task file, identical checkpoints, a layer out of range) prints one `crossray: error: ...` line and
exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from crossray.checkpoints import Family, resolve_family

logger = logging.getLogger("crossray")


def error_line(message: object) -> None:
    """The one line every crossray command prints for bad input or a failure (stderr)."""
    print(f"crossray: error: {message}", file=sys.stderr)


def family_from_args(args: argparse.Namespace) -> Family:
    revisions = [r for r in (args.revisions or "").split(",") if r]
    return resolve_family(args.family, revisions=revisions, naming=args.naming, tokenizer=args.tokenizer)


def _add_family_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", required=True,
                   help="local family folder (sub-folders are revisions), hub repo id, or toy")
    p.add_argument("--revisions", help="comma-separated revisions (default: all local ones)")
    p.add_argument("--naming", choices=["pythia", "olmo", "bloom", "plain"],
                   help="revision naming scheme (default: from family.json, else pythia for hub)")
    p.add_argument("--tokenizer", help="tokenizer repo or folder when not stored with checkpoints")


def cmd_toy_build(args: argparse.Namespace) -> int:
    from crossray.toy.build import ToyConfig, build_toy_family

    out = build_toy_family(args.out, ToyConfig(seed=args.seed))
    print(out)
    return 0


def cmd_checkpoints_check(args: argparse.Namespace) -> int:
    from crossray.checkpoints import resolve_checkpoint_set
    from crossray.models.layer import check_layer, find_blocks, load_model

    family = family_from_args(args)
    revisions = family.available_revisions()
    cset = resolve_checkpoint_set(family, revisions)
    rows = cset.describe()
    if args.layer is not None:
        for row in rows:
            model = load_model(family, row["revision"], device="cpu")  # its blocks and width only
            blocks = find_blocks(model, family.block_path)
            check_layer(args.layer, len(blocks), f"{family.name}@{row['revision']}")
            row["d_model"] = int(model.config.hidden_size)
    print(json.dumps(rows, indent=2))
    return 0


def cmd_tasks_accuracy(args: argparse.Namespace) -> int:
    import torch

    from crossray.accuracy import accuracy_curves, format_curves, write_accuracy

    family = family_from_args(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # a local command: the machine's GPU if any
    rows, tasks = accuracy_curves(family, args.task, family.available_revisions(), device=device)
    for t in tasks:
        logger.info("task %s: kept %d of %d, skipped %s", t.name, len(t.examples), t.n_rows,
                    dict(t.skipped) or "none")
    if args.out:
        write_accuracy(rows, tasks, args.out)
        logger.info("wrote %s/accuracy.{parquet,csv,json}", args.out)
    print(format_curves(rows, "prefix_accuracy"))
    print(format_curves(rows, "sentence_accuracy"))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from crossray.config import load_config
    from crossray.plan import load_throughput, plan_for, plan_text
    from crossray.schema import overrides_from

    throughput = load_throughput(args.throughput) if args.throughput else None
    plan = plan_for(load_config(args.config, overrides_from(args)), throughput)
    print(json.dumps(plan) if args.json else plan_text(plan))
    return 0


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options of a pipeline run (`crossray run`, `python -m jobs.pipeline`) besides the config."""
    p.add_argument("--json", action="store_true",
                   help="print the run's summary as one JSON object on the last line")
    p.add_argument("--wait", action="store_true",
                   help="wait for another run holding the run folder to finish (default: refuse at once)")


def build_parser(more: Callable[[argparse._SubParsersAction], None] | None = None
                 ) -> argparse.ArgumentParser:
    """The parser of the library's commands; `more(subparsers)` adds others (jobs.cli: run, serve)."""
    parser = argparse.ArgumentParser(prog="crossray", description="Crosscoders across pretraining "
                                     "checkpoints: when does a language model learn what it learns?")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    if more is not None:
        more(sub)

    toy = sub.add_parser("toy", help="the embedded toy model family").add_subparsers(
        dest="toy_command", required=True)
    build = toy.add_parser("build", help="build (or reuse) the toy family")
    build.add_argument("--out", help="folder (default: the cache, keyed by config hash)")
    build.add_argument("--seed", type=int, default=0)
    build.set_defaults(func=cmd_toy_build)

    ck = sub.add_parser("checkpoints", help="checkpoint sets").add_subparsers(
        dest="ck_command", required=True)
    check = ck.add_parser("check", help="hash a checkpoint set; refuse identical checkpoints")
    _add_family_args(check)
    check.add_argument("--layer", type=int, help="also check the layer exists in every checkpoint")
    check.set_defaults(func=cmd_checkpoints_check)

    tasks = sub.add_parser("tasks", help="minimal-pair tasks").add_subparsers(
        dest="tasks_command", required=True)
    acc = tasks.add_parser("accuracy", help="score every checkpoint on tasks")
    _add_family_args(acc)
    acc.add_argument("--task", action="append", required=True,
                     help="task JSONL file, folder of them, or hub data set (repeatable)")
    acc.add_argument("--out", help="folder for accuracy.{parquet,csv,json}")
    acc.set_defaults(func=cmd_tasks_accuracy)

    from crossray.config import Config
    from crossray.schema import add_flags

    plan = sub.add_parser("plan", help="tokens, bytes, memory and GPU hours of a config, before running it")
    plan.add_argument("config", help="run config (YAML)")
    plan.add_argument("--throughput", metavar="FILE", help="measured throughputs (JSON: bench/gpu.sh writes "
                      "$OUT/throughput.json) to plan the GPU hours from, instead of the assumed H100 figures")
    plan.add_argument("--json", action="store_true", help="one JSON object (tokens, activation_bytes, "
                      "disk_bytes, mode, gpu_hours, ...)")
    add_flags(plan, Config)
    plan.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = (parser or build_parser()).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per checkpoint load drowns the real progress
    try:
        return args.func(args)
    except ValueError as e:  # CheckpointError and TaskError among them
        error_line(e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
