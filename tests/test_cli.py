"""The command line as a user meets it: help for every command, and user mistakes.

A mistake (bad path, bad option value, unsupported model, missing calibration file) must end
with exit code 2 and one clear line on stderr, never a traceback. The commands run as
subprocesses of the installed ``awq-jax`` entry point (the one next to ``sys.executable``),
so the test sees exactly what a user sees, import-time noise included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from convert.cli import build_parser

AWQ_JAX = Path(sys.executable).with_name("awq-jax")
SUBCOMMANDS = ["import-gguf", "generate", "eval", "quantize", "demo", "bench"]


def awq_jax(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [str(AWQ_JAX), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def assert_user_error(r: subprocess.CompletedProcess, *needles: str, usage: bool = False) -> str:
    """Exit 2, no traceback, and one stderr line that names the problem; returns that line.

    ``usage``: argparse's rejection, which prints the usage lines before its error line.
    """
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines, "no message on stderr"
    if usage:
        assert lines[0].startswith("usage: awq-jax"), r.stderr
    else:
        assert len(lines) == 1, f"expected one line on stderr, got:\n{r.stderr}"
        assert lines[0].startswith("awq-jax "), lines[0]
    last = lines[-1]
    assert "error:" in last, r.stderr
    for needle in needles:
        assert needle in last, (needle, last)
    return last


def test_entry_point_installed() -> None:
    assert AWQ_JAX.is_file(), f"{AWQ_JAX} missing: install the package (make venv)"


def test_top_level_help_lists_every_command() -> None:
    r = awq_jax("--help", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "AWQ" in r.stdout
    for cmd in SUBCOMMANDS:
        assert cmd in r.stdout


def test_no_command_is_a_usage_error() -> None:
    r = awq_jax(timeout=60)
    assert_user_error(r, "required", usage=True)


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_subcommand_help_explains_every_option(cmd: str) -> None:
    r = awq_jax(cmd, "--help", timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: awq-jax {cmd}")
    sub = build_parser()._subparsers._group_actions[0].choices[cmd]  # the same parser
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"awq-jax {cmd} {action.option_strings[0]} has no help text"
            assert action.option_strings[-1] in r.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["generate", "--prompt", "hi", "--dtype", "float8"], "--dtype"),
        (["quantize", "--method", "gptq"], "--method"),
        (["eval", "--duo-scaling", "maybe"], "--duo-scaling"),
        (["quantize", "--group-size", "sixty-four"], "--group-size"),
        (["eval", "--windows", "0"], "--windows"),
        (["quantize", "--n-samples", "-3"], "--n-samples"),
        (["generate"], "--prompt"),
        (["bench", "everything"], "what"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_bad_option_values(args: list[str], needle: str) -> None:
    """Rejected by argparse before anything is loaded: usage, then one error line."""
    assert_user_error(awq_jax(*args, timeout=60), needle, usage=True)


def test_missing_model_dir(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    r = awq_jax("generate", "--prompt", "hi", "--model", str(missing))
    assert_user_error(r, "not found", str(missing))


def test_model_path_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"not a folder")
    assert_user_error(awq_jax("eval", "--model", str(f)), str(f))


def test_unsupported_model_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 768}))
    r = awq_jax("quantize", "--method", "rtn", "--model", str(tmp_path), "--output", "out")
    assert_user_error(r, "gpt2", "unsupported")


def test_corrupt_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    assert_user_error(awq_jax("eval", "--model", str(tmp_path)), "config.json", "JSON")


def test_missing_gguf(tmp_path: Path) -> None:
    r = awq_jax("import-gguf", str(tmp_path / "x.gguf"), str(tmp_path / "out"), timeout=120)
    assert_user_error(r, "x.gguf")


@pytest.mark.slow
def test_group_size_must_divide_hidden_size(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    r = awq_jax("quantize", "--method", "rtn", "--group-size", "100", "--output", out)
    assert_user_error(r, "group size 100", "576", "choose 32 or 64")


@pytest.mark.slow
def test_missing_calibration_file(tmp_path: Path) -> None:
    missing = tmp_path / "calib.txt"
    r = awq_jax("quantize", "--calib", str(missing), "--output", str(tmp_path / "out"))
    assert_user_error(r, "calibration file not found", str(missing))


@pytest.mark.slow
def test_bad_calibration_jsonl(tmp_path: Path) -> None:
    bad = tmp_path / "calib.jsonl"
    bad.write_text('{"content": "no text field"}\n')
    r = awq_jax("quantize", "--calib", str(bad), "--output", str(tmp_path / "out"))
    assert_user_error(r, "calib.jsonl:1", "'text'")


@pytest.mark.slow
def test_too_little_calibration_text(tmp_path: Path) -> None:
    short = tmp_path / "calib.txt"
    short.write_text("Four score and seven years ago.")
    r = awq_jax("quantize", "--calib", str(short), "--n-samples", "2", "--output", "out")
    assert_user_error(r, "fewer than")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_output_exists(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    for overwrite in ((), ("--overwrite",)):  # not a checkpoint: never replaced
        r = awq_jax("quantize", "--method", "rtn", "--output", str(tmp_path), *overwrite)
        assert_user_error(r, "refusing to overwrite")
    (tmp_path / "config.json").write_text("{}")  # looks like one: --overwrite would do
    r = awq_jax("quantize", "--method", "rtn", "--output", str(tmp_path))
    assert_user_error(r, "already exists", "--overwrite")
    assert (tmp_path / "notes.txt").read_text() == "not a checkpoint"


def test_options_without_effect_are_refused(tmp_path: Path) -> None:
    """Refused before anything is loaded, so these return at once."""
    r = awq_jax("eval", "--w-bit", "3", "--calib", "x.txt", timeout=60)
    assert_user_error(r, "--w-bit, --calib apply only with --compare")
    r = awq_jax("eval", "--group-size=64", timeout=60)  # given, though equal to the default
    assert_user_error(r, "--group-size applies only with --compare")
    out = str(tmp_path / "out")
    r = awq_jax("quantize", "--method", "rtn", "--n-samples", "4", "--output", out, timeout=60)
    assert_user_error(r, "--n-samples applies only to --method awq")
    r = awq_jax("quantize", "--w-bit", "3", "--output", out, timeout=60)
    assert_user_error(r, "4-bit weights only")


def test_output_is_checked_before_any_work(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    args = ("quantize", "--method", "rtn", "--model", str(model))
    r = awq_jax(*args, "--output", str(model), "--overwrite", timeout=60)
    assert_user_error(r, "would replace the input")
    r = awq_jax(*args, "--output", str(tmp_path), "--overwrite", timeout=60)  # its parent
    assert_user_error(r, "would replace the input")
    (tmp_path / "file").write_text("x")
    r = awq_jax(*args, "--output", str(tmp_path / "file" / "out"), timeout=60)
    assert_user_error(r, "is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "model"]
    r = awq_jax("quantize", "--method", "rtn", timeout=60)
    assert_user_error(r, "--output", usage=True)


def test_bench_needs_a_gpu() -> None:
    import jax

    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is present")
    for what in ("generate", "profile"):
        assert_user_error(awq_jax("bench", what, "--quick", timeout=120), "GPU")
