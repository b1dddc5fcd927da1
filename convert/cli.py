"""``awq-jax``: the command line. Each subcommand is a thin wrapper over one library call.

A user mistake (bad path, bad option value, unsupported model, corrupt file, an output folder
that cannot be written) ends with one clear line on stderr and exit code 2, never a traceback.
Options that would have no effect in a command line (quantization options of ``eval``
without ``--compare``, AWQ options with ``--method rtn``) are refused the same way. Ctrl-C
(exit 130) and SIGTERM (exit 143) stop cleanly: an output being written is removed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from collections.abc import Sequence

# OSError: missing files, existing outputs, unwritable or full disks; all name their path.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup (`convert.outdir`) runs."""


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (so 0 or -1 windows/samples/tokens is a usage error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _add_model_arg(
    p: argparse.ArgumentParser, what: str = "float safetensors, or an AutoAWQ GEMM checkpoint"
) -> None:
    p.add_argument(
        "--model",
        metavar="DIR",
        default=None,
        help=f"Hugging Face model folder ({what}). Default: the bundled "
        "SmolLM2-135M-Instruct, converted once into the cache ($AWQ_JAX_CACHE, default "
        "~/.cache/awq-jax).",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="parameter/activation dtype (auto: float32 on CPU, bfloat16 on GPU)",
    )


def _add_quant_args(p: argparse.ArgumentParser, *, with_compare: bool = False) -> None:
    """The quantization, calibration and search options; ``with_compare``: ``eval``'s, which
    apply only with ``--compare`` (`_refuse_unused` checks)."""
    only = " (with --compare)" if with_compare else ""
    g = p.add_argument_group("quantization" + only)
    g.add_argument(
        "--w-bit",
        type=int,
        default=4,
        help="bits per weight, 2..8 (default 4; a saved checkpoint holds 4 only)",
    )
    g.add_argument(
        "--group-size",
        type=int,
        default=64,
        help="rows per quantization group along the input dim; must divide it; "
        "-1 = per output channel (default 64: 128 does not divide SmolLM2's 576)",
    )
    g.add_argument(
        "--no-zero-point",
        action="store_true",
        help="symmetric quantization instead of asymmetric with a zero point",
    )
    c = p.add_argument_group("calibration (AWQ)" + only)
    c.add_argument(
        "--calib",
        nargs="+",
        metavar="FILE",
        default=None,
        help="calibration text files (.txt, or .jsonl with a 'text' field); default: "
        "the bundled State of the Union speeches up to 1989",
    )
    c.add_argument(
        "--n-samples", type=_positive_int, default=128, help="calibration blocks (default 128)"
    )
    c.add_argument(
        "--seqlen",
        type=_positive_int,
        default=512,
        help="tokens per calibration block (default 512)",
    )
    c.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")
    s = p.add_argument_group("search (AWQ)" + only)
    s.add_argument(
        "--duo-scaling",
        default="true",
        choices=["true", "false", "both"],
        help="scale candidates x^r / w^(1-r) (AutoAWQ, default), x^r (paper), or both",
    )
    s.add_argument("--grid", type=_positive_int, default=20, help="ratio grid points (default 20)")
    s.add_argument(
        "--inclusive-grid",
        action="store_true",
        help="grid over [0, 1] inclusive (llm-compressor) instead of AutoAWQ's [0, 1)",
    )
    s.add_argument("--no-clip", action="store_true", help="skip the clip search")
    s.add_argument(
        "--gqa-vo",
        action="store_true",
        help="also smooth v->o on GQA models with a scale shared per kv head "
        "(not in the reference implementations)",
    )
    s.add_argument(
        "--batch-tokens",
        type=_positive_int,
        default=None,
        help="split calibration forwards into chunks of at most this many tokens "
        "(bounds device memory on big models; default: all blocks at once)",
    )
    p.set_defaults(
        _quant_options=list(g._group_actions),
        _awq_options=[a for group in (c, s) for a in group._group_actions],
    )


def _refuse_unused(args: argparse.Namespace, actions, why: str) -> None:
    """ValueError naming the options among ``actions`` given on the command line (or holding
    a value other than their default)."""

    def given_(a: argparse.Action) -> bool:
        named = any(t == o or t.startswith(o + "=") for t in args._argv for o in a.option_strings)
        return named or getattr(args, a.dest) != a.default

    given = [a.option_strings[0] for a in actions if given_(a)]
    if given:
        raise ValueError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} {why}")


def _cmd_import_gguf(args: argparse.Namespace) -> None:
    from convert.gguf import import_gguf

    out = import_gguf(args.gguf, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")


def _cmd_generate(args: argparse.Namespace) -> None:
    from awq_jax.api import generate_text, load_model
    from awq_jax.generate import Sampling

    model = load_model(args.model, dtype=args.dtype)
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    t0 = time.perf_counter()
    texts = generate_text(
        model,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        chat=args.chat,
        sampling=sampling,
        seed=args.seed,
    )
    dt = time.perf_counter() - t0
    for prompt, text in zip(args.prompt, texts, strict=True):
        print(text if args.chat else prompt + text)
    print(
        f"[{len(texts)} x {args.max_new_tokens} tokens in {dt:.1f}s, compile included]",
        file=sys.stderr,
    )


def _check_finite(result: dict) -> None:
    """ValueError for a NaN or infinite perplexity (not a result: and not valid JSON)."""
    bad = [k for k, v in result["results"].items() if not math.isfinite(v["ppl"])]
    if bad:
        raise ValueError(
            f"perplexity of {', '.join(bad)} is not finite: the model computes NaN or inf "
            "(non-finite weights, or activations that overflow --dtype)"
        )


def _cmd_eval(args: argparse.Namespace) -> None:
    from awq_jax.api import load_model, model_perplexity

    if not args.compare:
        _refuse_unused(args, args._quant_options + args._awq_options, "only with --compare")
    model = load_model(args.model, dtype=args.dtype)
    if args.compare:  # progress bars go to stderr, so --json output stays clean
        from awq_jax.pipeline import compare, format_compare_table, quant_settings_from_args

        settings, calib = quant_settings_from_args(args)
        result = compare(model, settings, calib, windows=args.windows)
        _check_finite(result)
        print(json.dumps(result, indent=2) if args.json else format_compare_table(result))
        return
    r = model_perplexity(model, windows=args.windows)
    result = {
        "model": str(model.path),
        "windows": r["windows"],
        "tokens": r["tokens"],
        "seqlen": 512,
        # A quantized checkpoint is labelled with its method ("awq", "rtn", or "unknown").
        "results": {(model.quantization or {}).get("method", "fp"): {"ppl": r["ppl"]}},
    }
    if model.quantization:
        result["quantization"] = model.quantization
    _check_finite(result)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{model.name}: perplexity {r['ppl']:.3f} over {r['windows']} windows "
            f"of 512 tokens ({r['tokens']} predicted tokens)"
        )


def _cmd_quantize(args: argparse.Namespace) -> None:
    from awq_jax.api import load_model
    from awq_jax.checkpoint import check_saveable, save_quantized
    from awq_jax.pipeline import quant_settings_from_args, quantize_model
    from convert.outdir import check_destination

    # Everything that can be refused is refused before the work (loading, calibration, search).
    if args.method == "rtn":
        _refuse_unused(args, args._awq_options, "only to --method awq")
    if args.w_bit != 4:
        raise ValueError(
            f"the AutoAWQ GEMM format holds 4-bit weights only, got --w-bit {args.w_bit}"
        )
    sources = [args.model] if args.model else []
    check_destination(args.output, args.overwrite, sources=sources)
    model = load_model(args.model, dtype=args.dtype)
    settings, calib = quant_settings_from_args(args)
    check_saveable(model, dtype=args.save_dtype)
    qmodel = quantize_model(model, settings, method=args.method, calib=calib)  # checks first
    out = save_quantized(qmodel, args.output, overwrite=args.overwrite, dtype=args.save_dtype)
    print(f"wrote {out}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from awq_jax.pipeline import run_demo

    run_demo(n_samples=args.n_samples, windows=args.windows)


def _cmd_bench(args: argparse.Namespace) -> None:
    from awq_jax.bench_generate import main as bench_main

    bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="awq-jax",
        description="AWQ (activation-aware 4-bit weight quantization) for Llama-family models "
        "in JAX: import, quantize, evaluate, save AutoAWQ GEMM checkpoints, generate.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "import-gguf",
        help="convert a llama-architecture GGUF into an HF folder",
        description="Convert a llama-architecture GGUF file into a Hugging Face "
        "folder (config.json, model.safetensors, tokenizer).",
    )
    p.add_argument("gguf", metavar="FILE", help="the .gguf file")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to create")
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="dtype of the written weights (default bfloat16)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT_DIR if it exists (only a folder holding a config.json)",
    )
    p.set_defaults(func=_cmd_import_gguf)

    p = sub.add_parser(
        "generate",
        help="generate text (greedy unless --temperature)",
        description="Generate a continuation with one jit-compiled prefill + "
        "decode loop. Greedy unless a temperature is given.",
    )
    p.add_argument(
        "--prompt",
        action="append",
        required=True,
        metavar="TEXT",
        help="prompt text (repeat for a batch)",
    )
    _add_model_arg(p)
    p.add_argument(
        "--max-new-tokens", type=_positive_int, default=32, help="tokens to generate (default 32)"
    )
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "eval",
        help="perplexity on the held-out SOTU speeches (1990 on)",
        description="Perplexity: SOTU speeches from 1990 on, non-overlapping "
        "512-token windows, exp(mean NLL). With --compare: FP vs RTN "
        "vs AWQ under the same quantization settings.",
    )
    _add_model_arg(p, "float safetensors, or an AutoAWQ GEMM checkpoint; --compare needs float")
    p.add_argument(
        "--windows",
        type=_positive_int,
        default=None,
        help="score only the first N windows (default: all full windows)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--compare",
        action="store_true",
        help="quantize with RTN and AWQ and print the FP / RTN / AWQ table",
    )
    _add_quant_args(p, with_compare=True)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "quantize",
        help="quantize a model with AWQ or RTN and save it",
        description="Quantize the linear layers of a model (AWQ search or plain "
        "round-to-nearest) and write an AutoAWQ GEMM checkpoint (4-bit) that vLLM, "
        "transformers and awq-jax load. The output is checked before any work and written "
        "atomically: a failed or interrupted run leaves nothing at --output.",
    )
    _add_model_arg(p, "float safetensors; not a quantized checkpoint")
    p.add_argument(
        "--method",
        default="awq",
        choices=["awq", "rtn"],
        help="awq: activation-aware scale + clip search (default); rtn: round to nearest",
    )
    p.add_argument(
        "--output",
        metavar="DIR",
        required=True,
        help="the checkpoint folder to write (not the input model's folder)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --output if it exists (only a folder holding a config.json)",
    )
    p.add_argument(
        "--save-dtype",
        default="float16",
        choices=["float16", "bfloat16"],
        help="dtype of the unquantized tensors (embeddings, norms, lm_head): float16, what "
        "the format's users expect (default), or bfloat16 for weights that overflow float16",
    )
    _add_quant_args(p)
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser(
        "demo",
        help="the README demo: FP/RTN/AWQ table and a generated sample",
        description="Quantize the bundled SmolLM2 with AWQ and RTN (w4, group "
        "64), print the perplexity table and a generated sample.",
    )
    p.add_argument(
        "--n-samples",
        type=_positive_int,
        default=8,
        help="AWQ calibration blocks of 512 tokens (default 8: ~10 min on 2 CPU cores)",
    )
    p.add_argument(
        "--windows",
        type=_positive_int,
        default=32,
        help="evaluation windows of 512 tokens (default 32)",
    )
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "bench",
        help="GPU benchmarks (generate throughput, decode profile, search time)",
        description="Benchmarks on a GPU: jit generate with bf16 vs int4 weights "
        "on an 8B-shaped random model ('generate'), where one decode step's GPU time "
        "goes, by kernel kind and layer by layer ('profile'), and the AWQ search time "
        "('search').",
    )
    p.add_argument("what", choices=["generate", "profile", "search"], help="which benchmark")
    p.add_argument(
        "--out",
        default="docs/benchmarks",
        help="folder for the JSON/markdown (default docs/benchmarks, relative to the "
        "current folder)",
    )
    p.add_argument("--quick", action="store_true", help="fewer configurations (smoke test)")
    p.add_argument(
        "--impls",
        default=None,
        help="generate/profile: comma-separated subset of int4,xla_int4,bf16 (default all)",
    )
    p.add_argument(
        "--cases",
        default=None,
        help="generate: comma-separated BATCHxPROMPT cases (default 1x128,8x128,"
        "32x128,1x2048,8x2048,32x2048)",
    )
    p.add_argument(
        "--rounds",
        type=_positive_int,
        default=1,
        help="generate: measure every case this many times, the implementations in turn "
        "within each round; the table gives the medians (default 1)",
    )
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    # transformers (imported for the tokenizer) warns on every run that torch is missing,
    # which awq-jax never needs; keep stderr for our own messages.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args._argv = argv

    def terminate(signum, frame):
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except _Terminated:
        print("terminated", file=sys.stderr)
        sys.exit(143)
    except _USER_ERRORS as e:
        print(f"awq-jax {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
