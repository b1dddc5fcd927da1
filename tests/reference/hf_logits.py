"""Reference: transformers' logits for a batch of token ids.

Usage: hf_logits.py MODEL_DIR IDS.npy OUT.npy [--dtype float32]

Runs in the reference environment (see tests/refenv.py). Loads the Hugging Face folder with
`AutoModelForCausalLM` (torch, CPU, eager attention, weights in --dtype, default float32), runs
the int token ids of shape [B, T] (no padding, no attention mask) and saves the logits as
float32 [B, T, V].
"""

import argparse

import numpy as np
import torch
from transformers import AutoModelForCausalLM


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("ids")
    p.add_argument("out")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = p.parse_args()
    ids = np.load(a.ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise SystemExit(f"{a.ids}: expected an integer array [B, T], got {ids.dtype}{ids.shape}")
    model = AutoModelForCausalLM.from_pretrained(
        a.model_dir, dtype=getattr(torch, a.dtype), attn_implementation="eager"
    )
    model.eval()
    with torch.inference_mode():
        logits = model(input_ids=torch.from_numpy(ids.astype(np.int64))).logits
    np.save(a.out, logits.float().numpy())


if __name__ == "__main__":
    main()
