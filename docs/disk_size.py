"""Disk size of a 4-bit AutoAWQ GEMM checkpoint against the bf16 checkpoint of the same model.

    .venv/bin/python docs/disk_size.py [--model DIR] [--group-size 64]

Quantizes the model (the bundled SmolLM2-135M-Instruct by default) with RTN, which writes the
same tensors, shapes and dtypes as AWQ (AWQ only changes their values), saves it with
`awq_jax.checkpoint.save_quantized` (float16 for the unquantized tensors, the format's usual
dtype), writes the same model's weights in bfloat16 with safetensors, and prints one markdown
table row with the weight-file sizes (``*.safetensors``; tokenizer and config files are the
same in both and left out).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    from awq_jax.api import load_model
    from awq_jax.checkpoint import save_quantized
    from awq_jax.pipeline import quantize_model
    from awq_jax.search import SearchSettings
    from awq_jax.weights import params_to_hf

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF folder (default: the bundled model)")
    ap.add_argument("--group-size", type=int, default=64)
    args = ap.parse_args()

    model = load_model(args.model, dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        bf16 = Path(tmp) / "bf16"
        bf16.mkdir()
        tensors = {
            k: np.ascontiguousarray(v.astype(ml_dtypes.bfloat16))
            for k, v in params_to_hf(model.params, model.config).items()
        }
        save_file(tensors, bf16 / "model.safetensors", metadata={"format": "pt"})
        del tensors
        settings = SearchSettings(w_bit=4, group_size=args.group_size)
        qmodel = quantize_model(model, settings, method="rtn", progress=False)
        awq = save_quantized(qmodel, Path(tmp) / "awq")
        b_bf16, b_awq = _weights_bytes(bf16), _weights_bytes(awq)
    print(
        f"| {model.name} | bf16 {b_bf16:,} B ({b_bf16 / 1e6:.1f} MB) | AWQ GEMM w4 "
        f"g{args.group_size}, fp16 embeddings/norms {b_awq:,} B ({b_awq / 1e6:.1f} MB) | "
        f"{b_awq / b_bf16:.3f}x ({b_bf16 / b_awq:.2f}x smaller) |"
    )


if __name__ == "__main__":
    main()
