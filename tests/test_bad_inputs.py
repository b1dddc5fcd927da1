"""Malformed user files fail early with a ValueError / OSError that names the file and the problem.

The CLI prints such errors as one line (tests/test_cli.py); a KeyError, TypeError or
ZeroDivisionError from deep inside would be a traceback, and a NaN embedding lookup from a
tokenizer larger than the model would be no error at all.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from tiny_configs import HF_CONFIGS
from tiny_gguf import VOCAB, write_tiny_gguf

import awq_jax.bundled as bundled
from awq_jax.api import load_model
from awq_jax.bundled import default_model_dir
from awq_jax.calib import read_text_files
from awq_jax.config import InvalidConfigError, ModelConfig
from awq_jax.tokenizer import check_vocab, load_tokenizer, tokenizer_size
from awq_jax.weights import CheckpointError, read_config, safetensors_files
from convert.gguf import import_gguf

LLAMA3 = HF_CONFIGS["llama_gqa_llama3_rope"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny llama HF folder (config, weights, tokenizer) imported from a tiny GGUF."""
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_gguf(root / "tiny.gguf")
    return import_gguf(root / "tiny.gguf", root / "hf", progress=False)


@pytest.fixture
def model_dir(tiny_model_dir, tmp_path) -> Path:
    """A fresh copy of the tiny model folder, for a test to break."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def _write_json(path: Path, body: Any) -> Path:
    path.write_text(json.dumps(body))
    return path


def _without(cfg: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in keys}


# ----------------------------------------------------------------------------- config.json


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (
            dict(_without(LLAMA3, "head_dim"), num_attention_heads=0),
            r"num_attention_heads must be a positive integer, got 0",
        ),
        (dict(LLAMA3, num_key_value_heads=0), r"num_key_value_heads must be .* got 0"),
        (dict(LLAMA3, hidden_size="64"), r"hidden_size must be a positive integer, got '64'"),
        (dict(LLAMA3, vocab_size=True), r"vocab_size must be a positive integer, got True"),
        (dict(LLAMA3, vocab_size=101.0), r"vocab_size must be a positive integer, got 101\.0"),
        (dict(LLAMA3, num_hidden_layers=-2), r"num_hidden_layers .* got -2"),
        (dict(LLAMA3, rms_norm_eps="1e-5"), r"rms_norm_eps must be a positive number"),
        (dict(LLAMA3, rope_theta=0), r"rope_theta must be a positive number, got 0"),
        (dict(LLAMA3, tie_word_embeddings="false"), r"tie_word_embeddings must be true or false"),
        (_without(LLAMA3, "vocab_size"), r"the required key 'vocab_size' is missing"),
        (
            dict(LLAMA3, num_key_value_heads=3),
            r"num_attention_heads=4 is not a multiple of num_key_value_heads=3",
        ),
        (
            dict(_without(LLAMA3, "head_dim"), num_attention_heads=6, num_key_value_heads=6),
            r"hidden_size=64 is not a multiple of num_attention_heads=6",
        ),
        (dict(LLAMA3, head_dim=15), r"head_dim=15 must be even"),
        (
            dict(LLAMA3, rope_scaling={"rope_type": "llama3", "factor": 8}),
            r"rope_scaling of rope_type 'llama3' lacks low_freq_factor, high_freq_factor, "
            r"original_max_position_embeddings",
        ),
        (
            dict(LLAMA3, rope_scaling=dict(LLAMA3["rope_scaling"], factor="8")),
            r"rope_scaling\.factor must be a positive number, got '8'",
        ),
        (
            dict(LLAMA3, rope_scaling=dict(LLAMA3["rope_scaling"], high_freq_factor=1.0)),
            r"rope_scaling\.high_freq_factor=1\.0 must be greater than low_freq_factor=1\.0",
        ),
        (dict(LLAMA3, rope_scaling=[8.0]), r"rope_scaling must be an object, got \[8\.0\]"),
        (
            dict(_without(LLAMA3, "rope_scaling"), rope_parameters={"rope_type": "llama3"}),
            r"rope_parameters of rope_type 'llama3' lacks factor",
        ),
        (dict(LLAMA3, layer_types="full_attention"), r"layer_types must be a list"),
    ],
)
def test_bad_config_values_name_file_key_and_value(tmp_path, cfg, match):
    path = _write_json(tmp_path / "config.json", cfg)
    with pytest.raises(InvalidConfigError, match=f"^{re.escape(str(path))}: {match}"):
        read_config(tmp_path)
    with pytest.raises(InvalidConfigError, match=f"^config.json: {match}"):
        ModelConfig.from_hf(cfg)


def test_good_tiny_configs_still_load():
    for cfg in HF_CONFIGS.values():
        ModelConfig.from_hf(cfg)


def test_config_must_be_a_json_object(tmp_path):
    path = _write_json(tmp_path / "config.json", [LLAMA3])
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))}: expected a JSON object"):
        read_config(tmp_path)
    with pytest.raises(InvalidConfigError, match="config.json: expected a JSON object, got list"):
        ModelConfig.from_hf([LLAMA3])  # type: ignore[arg-type]


def test_config_binary_or_invalid_json_names_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))} is not valid JSON"):
        read_config(tmp_path)


def test_load_model_rejects_bad_config_before_the_weights(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    _write_json(model_dir / "config.json", dict(cfg, num_key_value_heads=0))
    (model_dir / "model.safetensors").unlink()
    path = re.escape(str(model_dir / "config.json"))
    with pytest.raises(InvalidConfigError, match=f"{path}: num_key_value_heads .* got 0"):
        load_model(model_dir)


# ----------------------------------------------------------------------------- shard index


@pytest.mark.parametrize(
    "body",
    [
        '{"metadata": {}}',
        '{"weight_map": ["model.safetensors"]}',
        '{"weight_map": {"model.norm.weight": 3}}',
        '["model.safetensors"]',
    ],
)
def test_index_without_a_weight_map(tmp_path, body):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(body)
    with pytest.raises(CheckpointError, match=f"{re.escape(str(index))}: expected .*weight_map"):
        safetensors_files(tmp_path)


def test_index_invalid_json_names_file(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {')
    with pytest.raises(CheckpointError, match=f"{re.escape(str(index))} is not valid JSON"):
        safetensors_files(tmp_path)


# ----------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("body", ["{}", '{"model": {"type": "Nope"}}'])
def test_unparsable_tokenizer_json(model_dir, body):
    path = model_dir / "tokenizer.json"
    path.write_text(body)
    with pytest.raises(
        ValueError, match=f"{re.escape(str(path))} could not be parsed as a tokenizer"
    ) as e:
        load_tokenizer(model_dir)
    assert e.value.__cause__ is not None


@pytest.mark.parametrize(
    ("cut", "match"), [(500, " as JSON"), (0, " as JSON"), (-1, ": expected a JSON object")]
)
def test_truncated_tokenizer_json(model_dir, cut, match):
    path = model_dir / "tokenizer.json"
    path.write_text("[]" if cut < 0 else path.read_text()[:cut])
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} could not be parsed{match}"):
        load_tokenizer(model_dir)


def test_invalid_tokenizer_config_json(model_dir):
    path = model_dir / "tokenizer_config.json"
    path.write_text("{oops")
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} could not be parsed as JSON"):
        load_tokenizer(model_dir)


def test_tokenizer_larger_than_the_vocab(tiny_model_dir):
    """The bundled 49152-token tokenizer with a tiny model's vocab_size of 101, in small."""
    assert load_tokenizer(tiny_model_dir, vocab_size=VOCAB).vocab_size == VOCAB
    with pytest.raises(
        ValueError, match=f"tokenizer.json has {VOCAB} tokens but .*config.json vocab_size is 101"
    ):
        load_tokenizer(tiny_model_dir, vocab_size=101)


def test_load_model_checks_the_tokenizer_against_the_vocab(model_dir):
    """The audit's case: eval printed perplexity nan, generate an empty continuation."""
    cfg = json.loads((model_dir / "config.json").read_text())
    _write_json(model_dir / "config.json", dict(cfg, vocab_size=101))
    (model_dir / "model.safetensors").unlink()  # refused before the weights are read
    with pytest.raises(ValueError, match=f"has {VOCAB} tokens but .* vocab_size is 101"):
        load_model(model_dir)


def test_check_vocab_allows_padded_vocab(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    check_vocab(tok, VOCAB, tiny_model_dir)
    check_vocab(tok, VOCAB + 64, tiny_model_dir)
    with pytest.raises(ValueError, match=f"has {VOCAB} tokens .* vocab_size is {VOCAB - 1}"):
        check_vocab(tok, VOCAB - 1, tiny_model_dir)


def test_tokenizer_size_counts_every_id(model_dir):
    """Tokens past the model's vocabulary, in the vocab or added: all counted."""
    path = model_dir / "tokenizer.json"
    body = json.loads(path.read_text())
    body["model"]["vocab"].update({f"extra{i}": VOCAB + i for i in range(5)})
    body["added_tokens"].append(dict(body["added_tokens"][0], id=VOCAB + 5, content="<|new|>"))
    _write_json(path, body)
    assert tokenizer_size(load_tokenizer(model_dir)) == VOCAB + 6
    with pytest.raises(
        ValueError,
        match=f"{re.escape(str(path))} has {VOCAB + 6} tokens but .* vocab_size is {VOCAB}",
    ):
        load_tokenizer(model_dir, vocab_size=VOCAB)


# ----------------------------------------------------------------------------- calibration


def test_calib_jsonl_text_not_a_string(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": 5}\n')
    with pytest.raises(ValueError, match=r"calib\.jsonl:3: the 'text' field must be a string"):
        read_text_files([path])


def test_calib_directory(tmp_path):
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path))} is a directory"):
        read_text_files([tmp_path])


@pytest.mark.parametrize("name", ["calib.txt", "calib.jsonl"])
def test_calib_binary_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} is not UTF-8 text"):
        read_text_files([path])


# ----------------------------------------------------------------------------- cache


@pytest.fixture
def tiny_bundled_gguf(tmp_path, monkeypatch) -> Path:
    write_tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setattr(bundled, "bundled_gguf_path", lambda: tmp_path / "tiny.gguf")
    return tmp_path / "tiny.gguf"


def test_cache_path_is_a_file(tmp_path, monkeypatch, tiny_bundled_gguf):
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    monkeypatch.setenv("AWQ_JAX_CACHE", str(cache))
    with pytest.raises(
        NotADirectoryError, match=rf"{re.escape(str(cache))} \(\$AWQ_JAX_CACHE\) is not a dir"
    ):
        default_model_dir()
    monkeypatch.setenv("AWQ_JAX_CACHE", str(cache / "below"))
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        default_model_dir()
    assert cache.read_text() == "not a folder"


def _read_only(*args: Any, **kwargs: Any) -> Any:
    raise OSError(errno.EROFS, "Read-only file system")


@pytest.mark.parametrize("where", ["mkdir", "write"])
def test_cache_not_writable(tmp_path, monkeypatch, tiny_bundled_gguf, where):
    cache = tmp_path / "cache"
    monkeypatch.setenv("AWQ_JAX_CACHE", str(cache))
    if where == "mkdir":
        monkeypatch.setattr(Path, "mkdir", _read_only)
    else:
        cache.mkdir()
        monkeypatch.setattr(tempfile, "TemporaryFile", _read_only)
    with pytest.raises(
        OSError,
        match=rf"{re.escape(str(cache))} \(\$AWQ_JAX_CACHE\) is not writable "
        r"\(Read-only file system\)",
    ):
        default_model_dir()
