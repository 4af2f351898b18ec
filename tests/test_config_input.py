"""Hostile config input: values out of their declared range, run names that would leave the output
folder, and files too big, not regular or expanding through YAML aliases. Each is one
`crossray: error:` line and exit 2, found by the one loader before anything runs."""

import subprocess
import sys
from pathlib import Path

import pytest

from crossray.cli import main
from crossray.store import run_folder

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _error_lines(capsys) -> list[str]:
    return [x for x in capsys.readouterr().err.splitlines() if x.startswith("crossray: error:")]


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("train.lr", "nan", "train.lr must be a finite number, got nan"),
    ("train.lr", "-1", "train.lr must be > 0, got -1.0"),
    ("launch.actors", "0", "launch.actors must be >= 1, got 0"),
    ("launch.workers", "-1", "launch.workers must be >= 1, got -1"),
    ("launch.workers", "0", "launch.workers must be >= 1, got 0"),  # was a ZeroDivisionError in the plan
    ("evaluate.eval_sequences", "-100", "evaluate.eval_sequences must be >= 1, got -100"),
    ("analysis.context_k", "-5", "analysis.context_k must be >= 1, got -5"),
    ("attribution.threshold", "nan", "attribution.threshold must be a finite number, got nan"),
    ("extract.max_disk_gb", "nan", "extract.max_disk_gb must be a finite number, got nan"),
    ("attribution.low", "5", "attribution.low must be >= 0 and <= 1, got 5.0"),
    ("train.beta2", "1", "train.beta2 must be >= 0 and < 1, got 1.0"),
    ("train.crosscoder.n_latents", "0", "train.crosscoder.n_latents must be >= 1, got 0"),
    ("pipeline.name", "../../etc", "pipeline.name must be a name of 1-128 letters"),
    ("pipeline.name", "..", "pipeline.name must be a name"),
    ("pipeline.name", "a/b", "pipeline.name must be a name"),
    ("launch.register_name", "x/../y", "launch.register_name must be a name"),
])
def test_a_value_out_of_range_is_one_error_line(flag, value, says, capsys):
    assert main(["plan", TINY, f"--{flag}", value]) == 2
    [line] = _error_lines(capsys)
    assert f"tiny.yaml:{says}" in line, line


def test_cross_field_ranges_and_the_run_command(capsys):
    from jobs.cli import main as crossray

    assert main(["plan", TINY, "--attribution.low", "0.8", "--attribution.high", "0.5"]) == 2
    assert "low (0.8) must be below high (0.5)" in _error_lines(capsys)[0]
    assert crossray(["run", TINY, "--train.lr", "nan"]) == 2  # the same loader: refused before Ray
    [line] = _error_lines(capsys)
    assert "train.lr must be a finite number" in line


def test_a_run_folder_always_lies_inside_the_output_folder(tmp_path):
    assert run_folder(tmp_path, "tiny") == (tmp_path / "tiny").resolve()
    for name in ("../x", "..", ".", "a/b", "/etc"):
        with pytest.raises(ValueError, match="does not name a folder inside pipeline.out"):
            run_folder(tmp_path, name)


BOMB = "\n".join(["a0: &a0 [" + ",".join(['"lol"'] * 10) + "]"]
                 + [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 8)]
                 + ["pipeline:", "  name: *a7"])  # 10^8 leaves in 1 KB


def _refused(path: str) -> tuple[subprocess.CompletedProcess, int]:
    """`crossray plan PATH` in a fresh process; (result, its peak resident memory in bytes)."""
    wrapper = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, "
               "text=True); sys.stderr.write(p.stderr); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)")
    proc = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "jobs.cli", "plan", path],
                          capture_output=True, text=True, timeout=120)
    return proc, int(proc.stdout.split()[-1]) * 1024


@pytest.mark.parametrize(("make", "says"), [
    (lambda d: "/dev/zero", "/dev/zero: not a regular file"),
    (lambda d: _write(d / "bomb.yaml", BOMB), "its YAML aliases expand to over 100000 values"),
    (lambda d: _write(d / "big.yaml", "pipeline:\n  name: " + "x" * (2 << 20)), "over 1024 KiB"),
    (lambda d: _write(d / "deep.yaml", "[" * 5000 + "]" * 5000), "nested too deeply"),
])
def test_unbounded_config_input_is_refused_with_bounded_memory(tmp_path, make, says):
    proc, peak = _refused(make(tmp_path))
    assert proc.returncode == 2, proc.stderr[-2000:]
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("crossray: error:")]
    assert says in line and len(line) < 300, line  # a short line: never the value itself
    assert peak < 200 * 2**20, f"peak memory {peak / 2**20:.0f} MB"
    assert "Traceback" not in proc.stderr


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_error_messages_quote_a_short_prefix_of_a_bad_value(tmp_path, capsys):
    bad = tmp_path / "long.yaml"
    bad.write_text(Path(TINY).read_text().replace("name: tiny", "name: [" + ", ".join(["zz"] * 5000) + "]"))
    assert main(["plan", str(bad)]) == 2
    [line] = _error_lines(capsys)
    assert "pipeline.name" in line and len(line) < 300, line


