"""Reference: the tensors and config transformers' own GGUF loader makes of a GGUF file.

Usage: hf_gguf_tensors.py GGUF_PATH OUT_DIR

Runs in the reference environment (Python 3.11, torch CPU, transformers; see tests/refenv.py).
Loads `AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=torch.float32)` and
writes OUT_DIR/model.safetensors (float32 state dict; a tied `lm_head.weight` is left out, it
is the embedding) and OUT_DIR/config.json (the config transformers derived from the GGUF).
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM


def main() -> None:
    gguf_path, out_dir = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, out_dir / "model.safetensors")
    model.config.to_json_file(out_dir / "config.json")


if __name__ == "__main__":
    main()
