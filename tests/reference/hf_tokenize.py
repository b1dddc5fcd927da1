"""Reference: transformers' token ids for a text file.

Usage: hf_tokenize.py MODEL_DIR TEXT_FILE OUT.npy [--gguf-file NAME]

Runs in the reference environment (see tests/refenv.py). Loads `AutoTokenizer` from the
Hugging Face folder MODEL_DIR, or, with `--gguf-file NAME`, transformers' own conversion of the
GGUF file MODEL_DIR/NAME. Encodes the whole UTF-8 text without special tokens and saves the
ids as a 1-D int64 array.
"""

import argparse
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("text_file")
    p.add_argument("out")
    p.add_argument("--gguf-file", default=None)
    a = p.parse_args()
    kwargs = {"gguf_file": a.gguf_file} if a.gguf_file else {}
    tok = AutoTokenizer.from_pretrained(a.model_dir, **kwargs)
    text = Path(a.text_file).read_text(encoding="utf-8")
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    np.save(a.out, np.asarray(ids, dtype=np.int64))


if __name__ == "__main__":
    main()
