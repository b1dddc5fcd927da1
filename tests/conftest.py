"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bundled_model_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct as a Hugging Face folder (float32).

    Converted once from the GGUF into the user's cache (`$AWQ_JAX_CACHE`, default
    `~/.cache/awq-jax`) and reused by later sessions.
    """
    from awq_jax.bundled import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def sotu_eval_text() -> str:
    """The evaluation text: State of the Union speeches from 1990 on, joined by blank lines."""
    from awq_jax.bundled import sotu_text

    return sotu_text("eval")
