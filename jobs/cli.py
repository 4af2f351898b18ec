"""The installed `crossray` command: the library's commands plus `run` and `serve`, which need Ray.

    crossray run CONFIG.yaml [--json] [--section.field VALUE ...]   the pipeline (jobs.pipeline)
    crossray serve --run RUN [--port 8000]                         finished runs over HTTP (serve.app)
    crossray toy build | checkpoints check | tasks accuracy          (crossray.cli)

They live here, not in `crossray/`, because the library never imports Ray, `jobs` or `serve`.
"""

from __future__ import annotations

import argparse
import sys

from crossray import cli
from crossray.schema import add_flags


def _run(args: argparse.Namespace) -> int:
    from jobs import pipeline  # Ray and the pipeline: only for `run` (plan and the rest start fast)

    return pipeline.run_from_args(args)


def _more(sub: argparse._SubParsersAction) -> None:
    from crossray.config import Config

    run = sub.add_parser("run", help="run the pipeline on a config (screen ... analyse, tracked in MLflow)")
    run.add_argument("config", help="run config (YAML)")
    cli.add_run_options(run)
    run.add_argument("--address", default=None, help="Ray address (default: start a local one)")
    add_flags(run, Config)
    run.set_defaults(func=_run)
    sub.add_parser("serve", help="serve finished runs over HTTP with Ray Serve (crossray serve --help)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # its own parser
        from serve.app import main as serve_main

        return serve_main(argv[1:])
    return cli.main(argv, cli.build_parser(_more))


if __name__ == "__main__":
    raise SystemExit(main())
