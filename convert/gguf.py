"""Import a llama-architecture GGUF file as a standard Hugging Face model folder.

`import_gguf` writes `config.json` (LlamaForCausalLM), `model.safetensors`, `tokenizer.json`,
`tokenizer_config.json` and `generation_config.json`, so every other part of the project
(and transformers itself) only ever reads Hugging Face folders.

What follows the reference behaviour, and where:

* Tensors are dequantized with `gguf.quants.dequantize` (the same numpy code transformers'
  GGUF loader uses); a GGUF shape is ggml's `[ne0 = in, ne1 = out]`, so the HF / torch
  `[out, in]` shape is `reversed(t.shape)`.
* llama.cpp's `convert_hf_to_gguf.py` row-permutes `attn_q` / `attn_k` for its own rope
  layout; `unpermute_rows` undoes it (see `/work/shared/docs/DATA.md`). After that the tensors
  equal what `transformers` loads from the same GGUF (tested in `tests/test_gguf.py`).
* The tokenizer is rebuilt with the `tokenizers` library from `tokenizer.ggml.tokens` /
  `tokenizer.ggml.merges`, with the pre-tokenizer that `tokenizer.ggml.pre` names. Unlike
  transformers' GGUF converter it keeps the digit split of `pre = "smollm"`, and takes
  `add_bos_token` and the eos token from the GGUF instead of overriding them.

The importer is strict in the spirit of the rest of the loader: a GGUF key or tensor it
neither maps nor knowingly ignores is an error, never silently dropped.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize
from tqdm.auto import tqdm

from convert.outdir import check_destination, staged_dir

__all__ = ["SUPPORTED_ARCHITECTURES", "GGUFImportError", "import_gguf", "unpermute_rows"]

SUPPORTED_ARCHITECTURES = ("llama",)

# Output dtype name -> (numpy dtype, safetensors dtype tag).
_DTYPES: dict[str, tuple[Any, str]] = {
    "float32": (np.dtype(np.float32), "F32"),
    "float16": (np.dtype(np.float16), "F16"),
    "bfloat16": (np.dtype(ml_dtypes.bfloat16), "BF16"),
}

# GGUF `blk.N.<key>.weight` -> HF `model.layers.N.<value>.weight`.
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

# `llama.*` keys mapped into config.json, and those known to carry nothing we need (checked
# against the mapped values where they overlap). Anything else under `llama.` is rejected.
_LLAMA_KEYS_MAPPED = {
    "block_count",
    "context_length",
    "embedding_length",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.layer_norm_rms_epsilon",
    "rope.freq_base",
    "rope.dimension_count",
    "attention.key_length",
    "attention.value_length",
    "vocab_size",
}
_LLAMA_KEYS_CHECKED = {
    "rope.scaling.type": ("none", None),  # any real rope scaling is rejected
    "expert_count": (0, None),  # Mixtral-style MoE is stored as "llama" too
    "expert_used_count": (0, None),
}

# Pre-tokenizer types (`tokenizer.ggml.pre`) this importer knows how to rebuild.
_PRE_TOKENIZERS = ("smollm", "gpt2")

# gguf's token types (llama.cpp's llama_token_type).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


class GGUFImportError(ValueError):
    """The GGUF file is not one this importer can turn into a Hugging Face folder."""


def unpermute_rows(w_oi: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rope row permutation of an `attn_q` / `attn_k` weight.

    llama.cpp stores head `h`'s rows as interleaved pairs `(0, d/2), (1, d/2 + 1), ...`;
    HF's rotate-half layout keeps the two halves contiguous. For `w_oi` of shape
    `[n_heads * head_dim, in]`: reshape to `[n_heads, head_dim // 2, 2, in]`, swap axes 1 and
    2, reshape back (`n_heads` is the KV head count for `attn_k`).
    """
    rows = w_oi.shape[0]
    if rows % (2 * n_heads):
        raise GGUFImportError(f"cannot un-permute {rows} rows into {n_heads} heads of even size")
    w = w_oi.reshape(n_heads, rows // n_heads // 2, 2, *w_oi.shape[1:])
    return w.swapaxes(1, 2).reshape(w_oi.shape)


def import_gguf(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert a llama-architecture GGUF file into a Hugging Face folder at `out_dir`.

    `dtype` ("bfloat16", "float16" or "float32") is the dtype of every tensor in
    `model.safetensors` (dequantization itself is done in float32). The folder is written
    into a temporary sibling directory and renamed into place (`convert.outdir`), so
    `out_dir` either does not exist or is complete. If it already exists (and is not empty)
    this raises `FileExistsError` unless `overwrite=True`, and even then replaces only a
    folder that holds a config.json; `out_dir` is never the folder holding `gguf_path`.
    Returns `out_dir` as a `Path`.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if gguf_path.is_dir():
        raise GGUFImportError(f"{gguf_path} is a folder; pass the .gguf file inside it")
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    check_destination(out_dir, overwrite, sources=(gguf_path,))

    try:
        reader = GGUFReader(gguf_path)
    except (ValueError, IndexError, KeyError, struct.error) as e:
        raise GGUFImportError(f"{gguf_path}: not a readable GGUF file (truncated?): {e}") from e
    arch = _get(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFImportError(
            f"{gguf_path}: architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    try:
        config = _llama_config(reader, dtype)
        tokenizer_json, tokenizer_config = _tokenizer_files(reader, config)
        plan = _tensor_plan(reader, config)
    except GGUFImportError as e:
        raise GGUFImportError(f"{gguf_path}: {e}") from None

    with staged_dir(out_dir, overwrite, sources=(gguf_path,)) as tmp:
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", _generation_config(config))
        (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        _write_json(tmp / "tokenizer_config.json", tokenizer_config)
        _write_safetensors(
            tmp / "model.safetensors",
            _iter_hf_tensors(plan, config),
            [(hf, shape) for _, hf, shape in plan],
            dtype,
            progress=progress,
        )
    return out_dir


# ---------------------------------------------------------------------------------------------
# GGUF metadata


_MISSING = object()


def _get(reader: GGUFReader, key: str, default: Any = _MISSING) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise GGUFImportError(f"missing GGUF key {key!r}")
        return default
    return field.contents()


def _scalar_int(reader: GGUFReader, key: str, default: Any = _MISSING) -> int:
    field = reader.fields.get(key)
    if field is not None and field.types and field.types[0] == GGUFValueType.ARRAY:
        raise GGUFImportError(f"per-layer values for {key!r} are not supported")
    return int(_get(reader, key, default))


def _f32(x: float) -> float:
    """The shortest decimal that round-trips a float32 (GGUF stores 1e-5 as 9.99999975e-06)."""
    return float(str(np.float32(x)))


def _llama_config(reader: GGUFReader, dtype: str) -> dict[str, Any]:
    unknown = []
    for key in reader.fields:
        if not key.startswith("llama."):
            continue
        sub = key.removeprefix("llama.")
        if sub in _LLAMA_KEYS_MAPPED:
            continue
        if sub in _LLAMA_KEYS_CHECKED:
            if _get(reader, key) not in _LLAMA_KEYS_CHECKED[sub]:
                raise GGUFImportError(f"unsupported value {_get(reader, key)!r} for {key!r}")
            continue
        unknown.append(key)
    if unknown:
        raise GGUFImportError(f"unsupported GGUF keys: {', '.join(sorted(unknown))}")

    hidden = _scalar_int(reader, "llama.embedding_length")
    n_heads = _scalar_int(reader, "llama.attention.head_count")
    n_kv = _scalar_int(reader, "llama.attention.head_count_kv", n_heads)
    head_dim = _scalar_int(reader, "llama.attention.key_length", hidden // n_heads)
    if _scalar_int(reader, "llama.attention.value_length", head_dim) != head_dim:
        raise GGUFImportError("attention.value_length != attention.key_length is not supported")
    if _scalar_int(reader, "llama.rope.dimension_count", head_dim) != head_dim:
        raise GGUFImportError("partial rotary embeddings (rope.dimension_count) not supported")
    if n_heads % n_kv:
        raise GGUFImportError(f"head_count {n_heads} is not a multiple of head_count_kv {n_kv}")

    tokens = _get(reader, "tokenizer.ggml.tokens")
    vocab = _scalar_int(reader, "llama.vocab_size", len(tokens))
    tied = not any(t.name == "output.weight" for t in reader.tensors)

    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": _scalar_int(reader, "llama.feed_forward_length"),
        "num_hidden_layers": _scalar_int(reader, "llama.block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(_get(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(_get(reader, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": _scalar_int(reader, "llama.context_length"),
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": dtype,
    }
    for name, key in (
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("pad", "padding_token_id"),
    ):
        value = _get(reader, f"tokenizer.ggml.{key}", None)
        if value is not None:
            config[f"{name}_token_id"] = int(value)
    return config


def _generation_config(config: dict[str, Any]) -> dict[str, Any]:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: config[k] for k in keys if k in config}


# ---------------------------------------------------------------------------------------------
# Tensors


def _tensor_plan(
    reader: GGUFReader, config: dict[str, Any]
) -> list[tuple[Any, str, tuple[int, ...]]]:
    """(GGUF tensor, HF name, expected HF shape) for every tensor; rejects extras and gaps."""
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q_rows = config["num_attention_heads"] * config["head_dim"]
    kv_rows = config["num_key_value_heads"] * config["head_dim"]
    layer_shapes = {
        "attn_norm": (d,),
        "attn_q": (q_rows, d),
        "attn_k": (kv_rows, d),
        "attn_v": (kv_rows, d),
        "attn_output": (d, q_rows),
        "ffn_norm": (d,),
        "ffn_gate": (f, d),
        "ffn_up": (f, d),
        "ffn_down": (d, f),
    }
    global_shapes = {"token_embd": (v, d), "output_norm": (d,), "output": (v, d)}

    expected: dict[str, tuple[str, tuple[int, ...]]] = {}
    for g, hf in _GLOBAL_TENSORS.items():
        if g == "output" and config["tie_word_embeddings"]:
            continue
        expected[f"{g}.weight"] = (f"{hf}.weight", global_shapes[g])
    for i in range(config["num_hidden_layers"]):
        for g, hf in _LAYER_TENSORS.items():
            expected[f"blk.{i}.{g}.weight"] = (f"model.layers.{i}.{hf}.weight", layer_shapes[g])

    plan = []
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            raise GGUFImportError(
                "tensor 'rope_freqs.weight' (llama3-style rope scaling) is not supported"
            )
        if t.name not in expected:
            raise GGUFImportError(f"unexpected tensor {t.name!r}")
        hf, shape = expected.pop(t.name)
        got = tuple(int(n) for n in reversed(t.shape))
        if got != shape:
            raise GGUFImportError(f"tensor {t.name!r} has shape {got}, config implies {shape}")
        plan.append((t, hf, shape))
    if expected:
        raise GGUFImportError(f"missing tensors: {', '.join(sorted(expected))}")
    return plan


def _iter_hf_tensors(
    plan: list[tuple[Any, str, tuple[int, ...]]], config: dict[str, Any]
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, float32 array in HF [out, in] layout), one tensor at a time."""
    for t, hf, shape in plan:
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if t.name.endswith(".attn_q.weight"):
            w = unpermute_rows(w, config["num_attention_heads"])
        elif t.name.endswith(".attn_k.weight"):
            w = unpermute_rows(w, config["num_key_value_heads"])
        yield hf, w


def _write_safetensors(
    path: Path,
    tensors: Iterator[tuple[str, np.ndarray]],
    layout: list[tuple[str, tuple[int, ...]]],
    dtype: str,
    *,
    progress: bool,
) -> None:
    """Stream tensors into a safetensors file, holding one tensor in memory at a time.

    The header (names, shapes, offsets) is known before any data from the GGUF shapes, so the
    file is written front to back: 8-byte little-endian header length, the JSON header padded
    with spaces to a multiple of 8 (as the safetensors library does), then the raw data.
    """
    np_dtype, tag = _DTYPES[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in layout:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
        header[name] = {
            "dtype": tag,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)

    bar = tqdm(
        total=len(layout),
        desc="Dequantizing GGUF tensors",
        unit="tensor",
        disable=not progress,
        file=sys.stderr,
    )
    with open(path, "wb") as f, bar:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for (name, shape), (got_name, w) in zip(layout, tensors, strict=True):
            assert name == got_name and w.shape == shape, (name, got_name, w.shape, shape)
            f.write(np.ascontiguousarray(w.astype(np_dtype)).tobytes())
            bar.update()


# ---------------------------------------------------------------------------------------------
# Tokenizer


def _tokenizer_files(reader: GGUFReader, config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(tokenizer.json text, tokenizer_config.json dict) rebuilt from the GGUF vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _get(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFImportError(
            f"tokenizer model {kind!r} is not supported (supported: 'gpt2', byte-level BPE)"
        )
    pre = _get(reader, "tokenizer.ggml.pre", None)
    if pre not in _PRE_TOKENIZERS:
        raise GGUFImportError(
            f"tokenizer pre-tokenizer {pre!r} is not supported "
            f"(supported: {', '.join(_PRE_TOKENIZERS)})"
        )
    tokens: list[str] = _get(reader, "tokenizer.ggml.tokens")
    token_types = _get(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFImportError("tokenizer.ggml.tokens has duplicate tokens")
    if len(tokens) != config["vocab_size"]:
        raise GGUFImportError(
            f"{len(tokens)} tokens in tokenizer.ggml.tokens but vocab_size {config['vocab_size']}"
        )
    merges = []
    for m in _get(reader, "tokenizer.ggml.merges"):
        pair = tuple(m.split(" "))
        if len(pair) != 2:
            raise GGUFImportError(f"malformed merge {m!r} in tokenizer.ggml.merges")
        merges.append(pair)

    tok = Tokenizer(
        models.BPE(
            vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=False
        )
    )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # llama.cpp's "smollm" regex splits every digit on its own before the GPT-2 regex.
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|>, ...) are special: matched in raw text, skipped on decode.
    typed = list(zip(tokens, token_types, strict=True))
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in typed if ty == _TOKEN_CONTROL]
    )
    tok.add_tokens(
        [AddedToken(t, normalized=False) for t, ty in typed if ty == _TOKEN_USER_DEFINED]
    )

    def token(key: str) -> str | None:
        i = config.get(key)
        return None if i is None else tokens[i]

    add_bos = bool(_get(reader, "tokenizer.ggml.add_bos_token", False))
    add_eos = bool(_get(reader, "tokenizer.ggml.add_eos_token", False))
    bos, eos = token("bos_token_id"), token("eos_token_id")
    if (add_bos and bos is None) or (add_eos and eos is None):
        raise GGUFImportError("add_bos_token / add_eos_token set without a bos / eos token id")
    if add_bos or add_eos:
        single = " ".join(
            ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
        )
        pair = f"{single} $B:1"
        special = [(t, vocab[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=list(dict.fromkeys(special))
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    unk_id = _get(reader, "tokenizer.ggml.unknown_token_id", None)
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": None if unk_id is None else tokens[int(unk_id)],
        "pad_token": token("pad_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    template = _get(reader, "tokenizer.chat_template", None)
    if template is not None:
        tokenizer_config["chat_template"] = template
    return tok.to_str(pretty=False), tokenizer_config


# ---------------------------------------------------------------------------------------------
# Files


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
