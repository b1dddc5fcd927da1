"""Runs reference scripts (tests/reference/*.py) in the Python 3.11 reference environment.

The references (transformers + torch on the CPU, AutoAWQ's packing code) need Python 3.11,
where the machine's CPU torch wheel installs; awq-jax needs Python >= 3.12 for jax. So the two
sides of a parity test live in two virtualenvs and talk through files: a test writes its inputs,
runs a script here with the refenv python, and reads the script's outputs.

`make refenv` builds the environment and `make test` exports its absolute path as
AWQ_JAX_REFENV; without it the calling test is skipped, saying so.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REFERENCE_DIR = Path(__file__).parent / "reference"


def refenv_python() -> Path:
    """The reference env's python, or ``pytest.skip`` naming ``make refenv``."""
    root = os.environ.get("AWQ_JAX_REFENV")
    if not root:
        pytest.skip("AWQ_JAX_REFENV is not set: run `make refenv` (`make test` sets it)")
    python = Path(root) / "bin" / "python"
    if not python.exists():
        pytest.skip(f"AWQ_JAX_REFENV={root} has no bin/python: run `make refenv`")
    return python


def run_reference(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs ``tests/reference/<script> *args`` in the refenv; fails the test with its stderr."""
    python = refenv_python()
    env = {
        **os.environ,
        "PYTHONHASHSEED": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",  # the references read local files only
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.pop("PYTHONPATH", None)  # nothing of the awq-jax venv leaks into the reference side
    proc = subprocess.run(
        [str(python), str(REFERENCE_DIR / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    if proc.returncode:
        pytest.fail(
            f"reference script {script} failed (exit {proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc
