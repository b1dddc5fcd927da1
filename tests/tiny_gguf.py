"""A tiny random llama GGUF file, written with `gguf.GGUFWriter`, for the importer's tests.

`write_tiny_gguf` returns the tensors the import must produce (HF names, [out, in], float32)
so that tests compare against values this file never derived from the importer: q/k are
stored row-permuted exactly as llama.cpp's `convert_hf_to_gguf.py` permutes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 128, 2, 4, 2, 16
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "Ġ t", "Ġt he"]


def byte_tokens() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (`bytes_to_unicode`)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return [out[b] for b in range(256)]


TOKENS = SPECIAL + byte_tokens() + ["he", "Ġt", "Ġthe"]
VOCAB = len(TOKENS)


def llama_cpp_permute(w_oi: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py), HF layout -> GGUF layout."""
    return (
        w_oi.reshape(n_heads, 2, w_oi.shape[0] // n_heads // 2, *w_oi.shape[1:])
        .swapaxes(1, 2)
        .reshape(w_oi.shape)
    )


def write_tiny_gguf(
    path: Path,
    *,
    arch: str = "llama",
    tied: bool = False,
    extra_keys: dict[str, Any] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    drop_tensors: tuple[str, ...] = (),
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write the file; return {HF name: expected float32 [out, in] tensor}."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    p = arch
    w.add_uint32(f"{p}.block_count", LAYERS)
    w.add_uint32(f"{p}.context_length", 256)
    w.add_uint32(f"{p}.embedding_length", HIDDEN)
    w.add_uint32(f"{p}.feed_forward_length", FFN)
    w.add_uint32(f"{p}.attention.head_count", HEADS)
    w.add_uint32(f"{p}.attention.head_count_kv", KV_HEADS)
    w.add_float32(f"{p}.rope.freq_base", 10000.0)
    w.add_float32(f"{p}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_uint32(f"{p}.rope.dimension_count", HEAD_DIM)
    for key, value in (extra_keys or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_uint32(key, value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(TOKENS)
    w.add_token_types([3] * len(SPECIAL) + [1] * (VOCAB - len(SPECIAL)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    )

    expected: dict[str, np.ndarray] = {}

    def add(gguf_name: str, hf_name: str, w_hf: np.ndarray, *, quant: bool = False) -> None:
        w_hf = w_hf.astype(np.float32)
        stored = w_hf
        if ".attn_q." in gguf_name:
            stored = llama_cpp_permute(w_hf, HEADS)
        elif ".attn_k." in gguf_name:
            stored = llama_cpp_permute(w_hf, KV_HEADS)
        if gguf_name in drop_tensors:
            return
        if quant:
            # Q8_0 quantizes each row on its own, so the row permutation commutes with it and
            # the expected value is the round trip of the HF-layout weight.
            q8 = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(gguf_name, gguf.quants.quantize(stored, q8), raw_dtype=q8)
            w_hf = gguf.quants.dequantize(gguf.quants.quantize(w_hf, q8), q8)
        else:
            w.add_tensor(gguf_name, stored)
        expected[hf_name] = w_hf

    add("token_embd.weight", "model.embed_tokens.weight", rng.normal(size=(VOCAB, HIDDEN)))
    for i in range(LAYERS):
        b, h = f"blk.{i}.", f"model.layers.{i}."
        add(b + "attn_norm.weight", h + "input_layernorm.weight", rng.normal(size=HIDDEN))
        add(b + "attn_q.weight", h + "self_attn.q_proj.weight",
            rng.normal(size=(HEADS * HEAD_DIM, HIDDEN)))  # fmt: skip
        add(b + "attn_k.weight", h + "self_attn.k_proj.weight",
            rng.normal(size=(KV_HEADS * HEAD_DIM, HIDDEN)), quant=True)  # fmt: skip
        add(b + "attn_v.weight", h + "self_attn.v_proj.weight",
            rng.normal(size=(KV_HEADS * HEAD_DIM, HIDDEN)))  # fmt: skip
        add(b + "attn_output.weight", h + "self_attn.o_proj.weight",
            rng.normal(size=(HIDDEN, HEADS * HEAD_DIM)))  # fmt: skip
        add(b + "ffn_norm.weight", h + "post_attention_layernorm.weight", rng.normal(size=HIDDEN))
        add(b + "ffn_gate.weight", h + "mlp.gate_proj.weight", rng.normal(size=(FFN, HIDDEN)))
        add(
            b + "ffn_up.weight",
            h + "mlp.up_proj.weight",
            rng.normal(size=(FFN, HIDDEN)),
            quant=True,
        )
        add(b + "ffn_down.weight", h + "mlp.down_proj.weight", rng.normal(size=(HIDDEN, FFN)))
    add("output_norm.weight", "model.norm.weight", rng.normal(size=HIDDEN))
    if not tied:
        add("output.weight", "lm_head.weight", rng.normal(size=(VOCAB, HIDDEN)))
    for name, t in (extra_tensors or {}).items():
        w.add_tensor(name, t)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected
