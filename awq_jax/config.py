"""Model configuration: one frozen dataclass for the whole Llama family.

`ModelConfig.from_hf` reads a Hugging Face ``config.json`` dict strictly: every key is either
handled, knowingly ignored (listed in ``_IGNORED_KEYS`` with why), or the config is rejected.
A model we would compute wrongly (an unimplemented rope scaling, an activation other than
SiLU, tensor-parallel pretraining slices) fails loudly instead of producing garbage, and so
does a malformed value (a count that is not a positive integer, a string for a number, heads
that do not divide evenly): `InvalidConfigError`, naming the file, the key and the value.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "InvalidConfigError",
    "ModelConfig",
    "RopeScaling",
    "UnsupportedModelError",
]

# model_type -> family defaults that the config.json of that family leaves implicit.
_FAMILY_DEFAULTS: dict[str, dict[str, bool]] = {
    "llama": {"qkv_bias": False, "qk_norm": False},
    "mistral": {"qkv_bias": False, "qk_norm": False},
    "qwen2": {"qkv_bias": True, "qk_norm": False},
    "qwen3": {"qkv_bias": False, "qk_norm": True},
}
SUPPORTED_MODEL_TYPES = tuple(_FAMILY_DEFAULTS)

# Keys that do not change the function the model computes at inference.
_IGNORED_KEYS = frozenset(
    {
        "architectures",
        "model_type",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "initializer_range",
        "use_cache",
        "attention_dropout",  # dropout: training only
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "_name_or_path",
        "quantization_config",  # read by the checkpoint loader
        "max_window_layers",  # only meaningful with use_sliding_window, which we check
        "layer_types",  # checked below: all full attention
        "tokenizer_class",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "is_llama_config",
        "rope_interleaved",
    }
)


class UnsupportedModelError(ValueError):
    """The checkpoint describes a model this implementation would compute incorrectly."""


class InvalidConfigError(UnsupportedModelError):
    """A malformed ``config.json``: not an object, or a value of the wrong type or range."""


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


def _positive_float(key: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise InvalidConfigError(f"{key} must be a positive number, got {value!r}")
    return float(value)


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidConfigError(f"{key} must be true or false, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama 3 frequency-dependent RoPE scaling (``rope_type: "llama3"``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A Llama-family decoder (Llama 2/3, Mistral, Qwen2/3, SmolLM)."""

    model_type: str = "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # biases on q/k/v (Qwen2)
    o_bias: bool = False  # bias on o_proj (Llama's attention_bias=True)
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm on each head of q and k before RoPE (Qwen3)
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(
        cls, cfg: Mapping[str, Any], *, source: str | os.PathLike[str] = "config.json"
    ) -> ModelConfig:
        """Builds a config from a Hugging Face ``config.json`` dict; rejects what it can't run.

        ``source`` (the file the dict was read from) prefixes every error message.

        Raises:
          InvalidConfigError: ``cfg`` is not a mapping, a required key is missing, or a value
            has the wrong type or range (the message names the key and the value).
          UnsupportedModelError: a model this implementation would compute incorrectly.
        """
        if not isinstance(cfg, Mapping):
            raise InvalidConfigError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
        try:
            return cls._from_hf(dict(cfg))
        except UnsupportedModelError as e:
            raise type(e)(f"{source}: {e}") from None

    @classmethod
    def _from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        model_type = cfg.get("model_type")
        if not isinstance(model_type, str) or model_type not in _FAMILY_DEFAULTS:
            raise UnsupportedModelError(
                f"unsupported architecture model_type={model_type!r} "
                f"(architectures={cfg.get('architectures')}); supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        family = _FAMILY_DEFAULTS[model_type]
        handled: set[str] = set()

        def take(key: str, default: Any = ...) -> Any:
            handled.add(key)
            if key in cfg and cfg[key] is not None:
                return cfg[key]
            if default is ...:
                raise InvalidConfigError(f"the required key {key!r} is missing")
            return default

        act = take("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(f"hidden_act={act!r} is not supported (only silu)")
        if _positive_int("pretraining_tp", take("pretraining_tp", 1)) != 1:
            raise UnsupportedModelError("pretraining_tp != 1 is not supported")

        rope_theta, rope_scaling = _parse_rope(cfg, take)

        sliding_window = None
        if model_type in ("qwen2", "qwen3"):
            take("sliding_window", None)
            if _bool("use_sliding_window", take("use_sliding_window", False)):
                raise UnsupportedModelError("use_sliding_window=true is not supported")
        else:
            sliding_window = take("sliding_window", None)
            if sliding_window is not None:
                _positive_int("sliding_window", sliding_window)
        layer_types = cfg.get("layer_types")
        if layer_types is not None and not isinstance(layer_types, list):
            raise InvalidConfigError(f"layer_types must be a list, got {layer_types!r}")
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise UnsupportedModelError(f"layer_types other than full_attention: {layer_types}")

        def count(key: str, default: Any = ...) -> int:
            return _positive_int(key, take(key, default))

        hidden = count("hidden_size")
        num_heads = count("num_attention_heads")
        num_kv_heads = count("num_key_value_heads", num_heads)
        if num_heads % num_kv_heads:
            raise InvalidConfigError(
                f"num_attention_heads={num_heads} is not a multiple of "
                f"num_key_value_heads={num_kv_heads}"
            )
        if cfg.get("head_dim") is None and hidden % num_heads:
            raise InvalidConfigError(
                f"hidden_size={hidden} is not a multiple of num_attention_heads={num_heads} "
                "(and there is no head_dim)"
            )
        head_dim = count("head_dim", hidden // num_heads)
        if head_dim % 2:
            raise InvalidConfigError(f"head_dim={head_dim} must be even (RoPE rotates pairs)")
        attention_bias = _bool("attention_bias", take("attention_bias", False))
        config = cls(
            model_type=model_type,
            vocab_size=count("vocab_size"),
            hidden_size=hidden,
            intermediate_size=count("intermediate_size"),
            num_layers=count("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_positive_float("rms_norm_eps", take("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=count("max_position_embeddings", 4096),
            tie_word_embeddings=_bool("tie_word_embeddings", take("tie_word_embeddings", False)),
            qkv_bias=family["qkv_bias"] or attention_bias,
            # Llama's attention_bias puts a bias on o_proj too; Qwen3's covers q/k/v/o the same.
            o_bias=attention_bias,
            mlp_bias=_bool("mlp_bias", take("mlp_bias", False)),
            qk_norm=family["qk_norm"],
            sliding_window=sliding_window,
        )
        unknown = sorted(set(cfg) - handled - _IGNORED_KEYS)
        if unknown:
            raise UnsupportedModelError(
                f"keys this implementation does not handle: {unknown}. "
                "Refusing to guess their effect."
            )
        return config

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` fields for this model (architecture only)."""
        arch = {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
        }[self.model_type]
        out: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "mlp_bias": self.mlp_bias,
        }
        if self.model_type in ("llama", "qwen3"):
            out["attention_bias"] = self.o_bias
        if self.rope_scaling is not None:
            out["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        return out


def _parse_rope(cfg: dict[str, Any], take: Callable[..., Any]) -> tuple[float, RopeScaling | None]:
    """``rope_theta`` + ``rope_scaling`` (transformers 4) or ``rope_parameters`` (5)."""
    params = take("rope_parameters", None)
    scaling = take("rope_scaling", None)
    theta = take("rope_theta", None)
    scaling_key = "rope_scaling"
    if params is not None:
        if not isinstance(params, dict):
            raise InvalidConfigError(f"rope_parameters must be an object, got {params!r}")
        theta = params.get("rope_theta", theta)
        if scaling is None:
            scaling, scaling_key = params, "rope_parameters"
    theta = 10000.0 if theta is None else _positive_float("rope_theta", theta)
    if scaling is None:
        return theta, None
    if not isinstance(scaling, dict):
        raise InvalidConfigError(f"{scaling_key} must be an object, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise UnsupportedModelError(
            f"rope scaling type {rope_type!r} is not supported (supported: default, llama3)"
        )
    required = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in required if scaling.get(k) is None]
    if missing:
        raise InvalidConfigError(
            f"{scaling_key} of rope_type 'llama3' lacks {', '.join(missing)} "
            f"(it needs {', '.join(required)})"
        )
    low = _positive_float(f"{scaling_key}.low_freq_factor", scaling["low_freq_factor"])
    high = _positive_float(f"{scaling_key}.high_freq_factor", scaling["high_freq_factor"])
    if high <= low:
        raise InvalidConfigError(
            f"{scaling_key}.high_freq_factor={high} must be greater than low_freq_factor={low}"
        )
    return theta, RopeScaling(
        factor=_positive_float(f"{scaling_key}.factor", scaling["factor"]),
        low_freq_factor=low,
        high_freq_factor=high,
        original_max_position_embeddings=_positive_int(
            f"{scaling_key}.original_max_position_embeddings",
            scaling["original_max_position_embeddings"],
        ),
    )


def rope_inv_freq(config: ModelConfig):
    """Inverse frequencies ``[head_dim // 2]`` (float32 numpy), with Llama 3 scaling if set."""
    import numpy as np

    d = config.head_dim
    # float32 arithmetic, as transformers computes it, so positions agree to the last bit.
    exponent = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    rs = config.rope_scaling
    if rs is None:
        return inv_freq
    # transformers' _compute_llama3_parameters.
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
