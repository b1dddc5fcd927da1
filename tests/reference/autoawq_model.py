"""A third-party AutoAWQ GEMM checkpoint of a whole (tiny) model, and what it computes.

Runs in the Python 3.11 refenv (torch, transformers 5.23, AutoAWQ 0.2.9 installed --no-deps);
it never imports awq-jax.

    python autoawq_model.py JOBS_JSON

JOBS_JSON is a list of {"config", "group_size", "out_dir", "ids", "logits"}. For each job:

- a random transformers model from "config" (norm weights and biases randomised too);
- every decoder linear (q/k/v/o, gate/up/down) quantized round-to-nearest with a zero point
  (AWQ_SPEC.md section 5, float16 scales) and packed by AutoAWQ's
  ``WQLinear_GEMM.from_linear``, the code its quantizer writes checkpoints with;
- written as AutoAWQ's ``save_quantized`` lays a checkpoint out: ``config.json`` by
  transformers' ``save_pretrained`` with AutoAWQ's ``quantization_config``
  (``to_transformers_dict``), the packed tensors plus every other tensor in float16 in
  ``model.safetensors``;
- "logits" (.npy, [B, T, V]): transformers' float32 logits for "ids" of the model the
  checkpoint describes (each linear's weight replaced by its dequantized value, every other
  tensor rounded to float16 as stored).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from autoawq_unpack import _check_version, _import_awq
from hf_random_model import random_model
from safetensors.torch import save_file

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rtn(weight_oi: torch.Tensor, group: int):
    """``(dequantized [out, in] float32, scales [in/g, out] f16, zeros [in/g, out] int32)``."""
    w_kn = weight_oi.t().float()
    k, n = w_kn.shape
    w_gsn = w_kn.reshape(k // group, group, n)
    w_max, w_min = w_gsn.amax(dim=1), w_gsn.amin(dim=1)
    scales = ((w_max - w_min).clamp(min=1e-5) / 15).half()
    s = scales.float()
    zeros = (-torch.round(w_min / s)).clamp(0, 15)
    q = (torch.round(w_gsn / s[:, None]) + zeros[:, None]).clamp(0, 15)
    deq_kn = ((q - zeros[:, None]) * s[:, None]).reshape(k, n)
    return deq_kn.t().contiguous(), scales, zeros.to(torch.int32)


def build(job: dict) -> None:
    gemm = _import_awq("awq.modules.linear.gemm")
    group = job["group_size"]
    model = random_model(job["config"])
    config = model.config
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if not (isinstance(module, torch.nn.Linear) and name.split(".")[-1] in LINEARS):
                continue
            deq, scales, zeros = rtn(module.weight, group)
            module.weight.copy_(deq)
            packed = gemm.WQLinear_GEMM.from_linear(module, 4, group, scales=scales, zeros=zeros)
            tensors[f"{name}.qweight"] = packed.qweight
            tensors[f"{name}.qzeros"] = packed.qzeros
            tensors[f"{name}.scales"] = packed.scales
            if module.bias is not None:
                tensors[f"{name}.bias"] = packed.bias
        # Everything else is stored in float16: the reference computes with those values.
        for name, p in model.named_parameters():
            module = name.rsplit(".", 1)[0]
            if f"{module}.qweight" in tensors:
                if name.endswith(".bias"):
                    p.copy_(p.half().float())
                continue
            p.copy_(p.half().float())
            tensors[name] = p.detach().half().contiguous()
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)

    out = Path(job["out_dir"])
    out.mkdir(parents=True)
    # AutoAWQ's save_quantized: the config through transformers, its quantization_config
    # from AwqConfig.to_transformers_dict() (version lower-cased), then its own weight files.
    model.config.quantization_config = {
        "quant_method": "awq",
        "zero_point": True,
        "group_size": group,
        "bits": 4,
        "version": "gemm",
        "modules_to_not_convert": None,
    }
    model.config.save_pretrained(out)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})

    ids = torch.from_numpy(np.load(job["ids"]).astype(np.int64))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    np.save(job["logits"], logits.float().numpy())


if __name__ == "__main__":
    _check_version()
    torch.set_num_threads(1)
    with open(sys.argv[1]) as f:
        for job in json.load(f):
            build(job)
