"""AutoAWQ 0.2.9's own GEMM packing code, run on CPU in the reference env (Python 3.11, torch).

Run by tests/test_autoawq.py with the refenv python (`make refenv`); it never imports awq-jax.
AutoAWQ is installed with --no-deps, so `import awq` fails on its missing dependencies: the
package's modules are loaded from its installed files under stub parent packages instead.

    python autoawq_unpack.py unpack CKPT_DIR OUT_DIR [CKPT_DIR OUT_DIR ...]
        For every `<m>.qweight` in the checkpoint (single file or shards), AutoAWQ's
        `unpack_awq` + `reverse_awq_order` (+ the `& 0xF` of its `dequantize_gemm`) give the
        integer codes and zero points, and `dequantize_gemm` gives the float16 weight
        `(iweight - izeros) * scales`. Writes OUT_DIR/<m>.{iweight,izeros,weight}.npy.

    python autoawq_unpack.py pack OUT_DIR
        A third-party checkpoint: random codes, zero points and float16 scales are turned into
        torch Linear layers and packed by AutoAWQ's `WQLinear_GEMM.from_linear` (the code
        AutoAWQ's quantizer uses to write checkpoints), saved with safetensors.torch in the
        AutoAWQ/transformers layout (two shards + index, AutoAWQ's config spellings).
        The ground truth goes to OUT_DIR/truth/<m>.{q,zeros,scales}.npy.

    python autoawq_unpack.py hf-config CKPT_DIR OUT_JSON
        What transformers 5.23 parses from the checkpoint's config.json (AutoConfig, AwqConfig).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file


def _import_awq(module: str):
    """Imports `awq.<...>` without running awq/__init__.py (which needs the skipped deps)."""
    if module in sys.modules:
        return sys.modules[module]
    if "awq" in sys.modules:
        root = Path(sys.modules["awq"].__path__[0])
    else:
        spec = importlib.util.find_spec("awq")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("autoawq is not installed in this environment (make refenv)")
        root = Path(next(iter(spec.submodule_search_locations)))
    parts = module.split(".")
    for i in range(1, len(parts)):
        name = ".".join(parts[:i])
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.__path__ = [str(root.joinpath(*parts[1:i]))]
            sys.modules[name] = stub
    return importlib.import_module(module)


def _check_version() -> None:
    from importlib.metadata import version

    v = version("autoawq")
    if v != "0.2.9":
        raise SystemExit(f"expected autoawq 0.2.9, found {v}")


def unpack(ckpt: Path, out: Path) -> None:
    pu = _import_awq("awq.utils.packing_utils")
    config = json.loads((ckpt / "config.json").read_text())
    qc = config["quantization_config"]
    bits = qc.get("bits", qc.get("w_bit"))
    group = qc.get("group_size", qc.get("q_group_size"))
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        files = json.loads(index.read_text())["weight_map"]
    else:
        with safe_open(ckpt / "model.safetensors", framework="pt") as f:
            files = dict.fromkeys(f.keys(), "model.safetensors")

    def get(key: str) -> torch.Tensor:
        with safe_open(ckpt / files[key], framework="pt") as f:
            return f.get_tensor(key)

    out.mkdir(parents=True, exist_ok=True)
    for key in sorted(files):
        if not key.endswith(".qweight"):
            continue
        m = key.removesuffix(".qweight")
        qweight, qzeros, scales = get(key), get(f"{m}.qzeros"), get(f"{m}.scales")
        g = qweight.shape[0] if group == -1 else group
        iweight, izeros = pu.unpack_awq(qweight, qzeros, bits)
        iweight, izeros = pu.reverse_awq_order(iweight, izeros, bits)
        iweight = torch.bitwise_and(iweight, 2**bits - 1)
        izeros = torch.bitwise_and(izeros, 2**bits - 1)
        weight = pu.dequantize_gemm(qweight, qzeros, scales, bits, g)
        assert weight.dtype == torch.float16, weight.dtype
        np.save(out / f"{m}.iweight.npy", iweight.numpy())
        np.save(out / f"{m}.izeros.npy", izeros.numpy())
        np.save(out / f"{m}.weight.npy", weight.numpy())


def pack(out: Path) -> None:
    gemm = _import_awq("awq.modules.linear.gemm")
    gen = torch.Generator().manual_seed(0)
    group = 64
    # (module, in, out, bias), a Qwen2-style bias. from_linear sizes qweight as out // 32 * 4
    # words, so AutoAWQ itself can only pack out % 32 == 0.
    layers = [
        ("model.layers.0.self_attn.q_proj", 256, 96, True),
        ("model.layers.0.mlp.down_proj", 384, 160, False),
        ("model.layers.1.self_attn.o_proj", 128, 128, False),
    ]
    tensors: dict[str, torch.Tensor] = {}
    truth = out / "truth"
    truth.mkdir(parents=True)
    for name, k, n, has_bias in layers:
        g = group
        q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
        zeros = torch.randint(0, 16, (k // g, n), generator=gen, dtype=torch.int32)
        # Powers of two times small integers keep the float32 round trip in from_linear exact.
        scales = (torch.randint(1, 2048, (k // g, n), generator=gen) * 2.0**-16).half()
        q[0, :8] = torch.tensor([0, 15, 0, 15, 15, 0, 15, 0])  # sign bit of a word set
        s_kn = scales.float().repeat_interleave(g, dim=0)
        z_kn = zeros.float().repeat_interleave(g, dim=0)
        linear = torch.nn.Linear(k, n, bias=has_bias)
        with torch.no_grad():
            linear.weight.copy_(((q.float() - z_kn) * s_kn).t())
            if has_bias:
                linear.bias.copy_(torch.randn(n, generator=gen))
        layer = gemm.WQLinear_GEMM.from_linear(linear, 4, g, scales=scales, zeros=zeros)
        tensors[f"{name}.qweight"] = layer.qweight
        tensors[f"{name}.qzeros"] = layer.qzeros
        tensors[f"{name}.scales"] = layer.scales
        if has_bias:
            tensors[f"{name}.bias"] = layer.bias
        np.save(truth / f"{name}.q.npy", q.numpy().astype(np.uint8))
        np.save(truth / f"{name}.zeros.npy", zeros.numpy().astype(np.uint8))
        np.save(truth / f"{name}.scales.npy", scales.numpy())
    tensors["model.norm.weight"] = torch.randn(128, generator=gen).half()
    tensors["lm_head.weight"] = torch.randn(32, 128, generator=gen).half()

    ckpt = out / "ckpt"
    ckpt.mkdir()
    names = sorted(tensors)
    shards = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, keys in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in keys}, ckpt / fname, {"format": "pt"})
        weight_map.update(dict.fromkeys(keys, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    # AutoAWQ's own spellings (its quant_config.json / vLLM's aliases) and upper-case version.
    config = {
        "model_type": "llama",
        "torch_dtype": "float16",
        "quantization_config": {
            "quant_method": "awq",
            "zero_point": True,
            "w_bit": 4,
            "q_group_size": group,
            "version": "GEMM",
        },
    }
    (ckpt / "config.json").write_text(json.dumps(config))


def hf_config(ckpt: Path, out_json: Path) -> None:
    """What transformers makes of our config.json: AutoConfig, then its AwqConfig."""
    from transformers import AutoConfig, AwqConfig

    config = AutoConfig.from_pretrained(ckpt)
    qc = AwqConfig.from_dict(config.quantization_config)
    parsed = {
        "model_type": config.model_type,
        "dtype": str(config.dtype).removeprefix("torch."),
        "bits": qc.bits,
        "group_size": qc.group_size,
        "zero_point": qc.zero_point,
        "format": str(getattr(qc.format, "value", qc.format)),
        "quant_method": str(getattr(qc.quant_method, "value", qc.quant_method)),
    }
    out_json.write_text(json.dumps(parsed))


def main(argv: list[str]) -> None:
    _check_version()
    torch.set_num_threads(1)
    if len(argv) >= 3 and len(argv) % 2 == 1 and argv[0] == "unpack":
        for ckpt, out in zip(argv[1::2], argv[2::2], strict=True):
            unpack(Path(ckpt), Path(out))
    elif len(argv) == 2 and argv[0] == "pack":
        pack(Path(argv[1]))
    elif len(argv) == 3 and argv[0] == "hf-config":
        hf_config(Path(argv[1]), Path(argv[2]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
