"""Reference side (runs in the Python 3.11 refenv with torch + transformers on the CPU).

    hf_random_model.py JOBS_JSON

JOBS_JSON is a list of {"config": {...}, "out_dir", "ids", "logits"} (one process for all:
importing torch is the slow part). For each job: a randomly initialised transformers model
from "config" (norm weights and biases randomised too, so their loading is tested), saved with
`save_pretrained` (safetensors) to "out_dir", and its float32 logits for the int token ids in
"ids" (.npy, [B, T]) written to "logits" (.npy, [B, T, V]).
"""

import json
import sys

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM


def random_model(cfg_dict: dict) -> torch.nn.Module:
    """A float32 transformers model with every parameter random (norms and biases too)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(**cfg_dict)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model


def build(cfg_dict: dict, out_dir: str, ids_path: str, logits_path: str) -> None:
    model = random_model(cfg_dict)
    model.save_pretrained(out_dir, safe_serialization=True)
    ids = torch.from_numpy(np.load(ids_path).astype(np.int64))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    np.save(logits_path, logits.float().numpy())


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    for job in jobs:
        build(job["config"], job["out_dir"], job["ids"], job["logits"])
