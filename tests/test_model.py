"""The Flax model against transformers (PyTorch, float32, CPU) and the strict loader.

The reference runs live in the Python 3.11 refenv (see tests/refenv.py for why). Tolerance:
both sides compute in float32 with the same operation order up to the matmul kernels, so
logits agree to float32 rounding noise; we allow a relative error ||ours - ref|| / ||ref|| of
1e-5 on tiny random models (measured: ~3e-7) and 1e-4 on the 30-layer real model, whose
activations are larger and whose depth accumulates rounding.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from refenv import run_reference
from tiny_configs import HF_BASE, HF_CONFIGS

from awq_jax.config import ModelConfig, UnsupportedModelError
from awq_jax.model import forward
from awq_jax.weights import CheckpointError, load_params, read_config

CONFIGS = HF_CONFIGS
REL_TOL_TINY = 1e-5
REL_TOL_REAL = 1e-4


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[str, tuple[Path, np.ndarray, np.ndarray]]:
    """Each config built, saved and run by transformers, in one reference process."""
    root = tmp_path_factory.mktemp("hf")
    ids = np.random.default_rng(0).integers(0, HF_BASE["vocab_size"], (2, 24)).astype(np.int64)
    np.save(root / "ids.npy", ids)
    jobs = [
        {
            "config": cfg,
            "out_dir": str(root / name),
            "ids": str(root / "ids.npy"),
            "logits": str(root / f"{name}.npy"),
        }
        for name, cfg in CONFIGS.items()
    ]
    (root / "jobs.json").write_text(json.dumps(jobs))
    run_reference("hf_random_model.py", str(root / "jobs.json"), timeout=600)
    return {name: (root / name, ids, np.load(root / f"{name}.npy")) for name in CONFIGS}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(hf_models, name):
    model_dir, ids, ref = hf_models[name]
    config = ModelConfig.from_hf(read_config(model_dir))
    params = load_params(model_dir, config, jnp.float32)
    ours = np.asarray(forward(config, params, jnp.asarray(ids, jnp.int32)))
    assert ours.shape == ref.shape
    assert _rel_err(ours, ref) < REL_TOL_TINY


@pytest.mark.slow
def test_real_model_logits_match_transformers(bundled_model_dir, sotu_eval_text, tmp_path):
    from awq_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(bundled_model_dir)
    ids = np.asarray([tok.encode(sotu_eval_text[:4000])[:128]], np.int64)
    np.save(tmp_path / "ids.npy", ids)
    run_reference(
        "hf_logits.py",
        str(bundled_model_dir),
        str(tmp_path / "ids.npy"),
        str(tmp_path / "ref.npy"),
        timeout=600,
    )
    ref = np.load(tmp_path / "ref.npy")
    config = ModelConfig.from_hf(read_config(bundled_model_dir))
    params = load_params(bundled_model_dir, config, jnp.float32)
    ours = np.asarray(forward(config, params, jnp.asarray(ids, jnp.int32)))
    assert _rel_err(ours, ref) < REL_TOL_REAL
    # Same predictions, not just close numbers.
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.99


# ----------------------------------------------------------------------------- bad input


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        read_config(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        read_config(tmp_path / "nope")


def test_unsupported_architecture_lists_supported():
    with pytest.raises(UnsupportedModelError, match="gpt2.*supported: llama, mistral, qwen2"):
        ModelConfig.from_hf({"model_type": "gpt2"})


def test_unsupported_rope_scaling():
    cfg = dict(CONFIGS["llama_mha_tied"], rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(UnsupportedModelError, match="yarn"):
        ModelConfig.from_hf(cfg)


def test_unknown_config_key_rejected():
    cfg = dict(CONFIGS["llama_mha_tied"], some_new_feature=True)
    with pytest.raises(UnsupportedModelError, match="some_new_feature"):
        ModelConfig.from_hf(cfg)


def test_shape_mismatch_names_tensor(hf_models, tmp_path):
    model_dir = _copy(hf_models["qwen2_bias"][0], tmp_path / "m")
    cfg = read_config(model_dir)
    cfg["intermediate_size"] = 128
    config = ModelConfig.from_hf(cfg)
    with pytest.raises(CheckpointError, match=r"mlp\.(gate|up|down)_proj\.weight.*shape"):
        load_params(model_dir, config, jnp.float32)


def test_truncated_safetensors_names_file(hf_models, tmp_path):
    model_dir = _copy(hf_models["llama_mha_tied"][0], tmp_path / "m")
    f = model_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    config = ModelConfig.from_hf(read_config(model_dir))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_params(model_dir, config, jnp.float32)


def test_missing_weights_and_pickles_refused(hf_models, tmp_path):
    model_dir = _copy(hf_models["llama_mha_tied"][0], tmp_path / "m")
    config = ModelConfig.from_hf(read_config(model_dir))
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_params(model_dir, config, jnp.float32)
    (model_dir / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="pickle.*never loaded"):
        load_params(model_dir, config, jnp.float32)


def test_sharded_checkpoint_loads(hf_models, tmp_path):
    from safetensors.numpy import load_file, save_file

    src, ids, ref = hf_models["qwen2_bias"]
    model_dir = _copy(src, tmp_path / "m")
    tensors = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, model_dir / fname)
        weight_map.update(dict.fromkeys(keys, fname))
    (model_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    config = ModelConfig.from_hf(read_config(model_dir))
    params = load_params(model_dir, config, jnp.float32)
    ours = np.asarray(forward(config, params, jnp.asarray(ids, jnp.int32)))
    assert _rel_err(ours, ref) < REL_TOL_TINY
    (model_dir / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_params(model_dir, config, jnp.float32)


def test_unexpected_tensor_rejected(hf_models, tmp_path):
    from safetensors.numpy import load_file, save_file

    model_dir = _copy(hf_models["llama_mha_tied"][0], tmp_path / "m")
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.layers.0.mlp.extra_proj.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, model_dir / "model.safetensors")
    config = ModelConfig.from_hf(read_config(model_dir))
    with pytest.raises(CheckpointError, match="extra_proj"):
        load_params(model_dir, config, jnp.float32)


def test_bf16_params_are_bf16(hf_models):
    model_dir = hf_models["llama_mha_tied"][0]
    config = ModelConfig.from_hf(read_config(model_dir))
    params = load_params(model_dir, config, jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
