"""Model configuration: one frozen dataclass for the whole Llama family.

`ModelConfig.from_hf` reads a Hugging Face ``config.json`` dict strictly: every key is either
handled, knowingly ignored (listed in ``_IGNORED_KEYS`` with why), or the config is rejected.
A model we would compute wrongly (an unimplemented rope scaling, an activation other than
SiLU, tensor-parallel pretraining slices) fails loudly instead of producing garbage.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

__all__ = ["SUPPORTED_MODEL_TYPES", "ModelConfig", "RopeScaling", "UnsupportedModelError"]

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
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Builds a config from a Hugging Face ``config.json`` dict; rejects what it can't run."""
        cfg = dict(cfg)
        model_type = cfg.get("model_type")
        if model_type not in _FAMILY_DEFAULTS:
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
                raise UnsupportedModelError(f"config.json lacks the required key {key!r}")
            return default

        act = take("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(f"hidden_act={act!r} is not supported (only silu)")
        if take("pretraining_tp", 1) != 1:
            raise UnsupportedModelError("pretraining_tp != 1 is not supported")

        rope_theta, rope_scaling = _parse_rope(cfg, take)

        sliding_window = None
        if model_type in ("qwen2", "qwen3"):
            take("sliding_window", None)
            if take("use_sliding_window", False):
                raise UnsupportedModelError("use_sliding_window=true is not supported")
        else:
            sliding_window = take("sliding_window", None)
        layer_types = cfg.get("layer_types")
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise UnsupportedModelError(f"layer_types other than full_attention: {layer_types}")

        hidden = take("hidden_size")
        num_heads = take("num_attention_heads")
        attention_bias = bool(take("attention_bias", False))
        config = cls(
            model_type=model_type,
            vocab_size=take("vocab_size"),
            hidden_size=hidden,
            intermediate_size=take("intermediate_size"),
            num_layers=take("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=take("num_key_value_heads", num_heads),
            head_dim=take("head_dim", hidden // num_heads),
            rms_norm_eps=float(take("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=take("max_position_embeddings", 4096),
            tie_word_embeddings=bool(take("tie_word_embeddings", False)),
            qkv_bias=family["qkv_bias"] or attention_bias,
            # Llama's attention_bias puts a bias on o_proj too; Qwen3's covers q/k/v/o the same.
            o_bias=attention_bias,
            mlp_bias=bool(take("mlp_bias", False)),
            qk_norm=family["qk_norm"],
            sliding_window=sliding_window,
        )
        unknown = sorted(set(cfg) - handled - _IGNORED_KEYS)
        if unknown:
            raise UnsupportedModelError(
                f"config.json has keys this implementation does not handle: {unknown}. "
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


def _parse_rope(cfg: dict[str, Any], take) -> tuple[float, RopeScaling | None]:
    """``rope_theta`` + ``rope_scaling`` (transformers 4) or ``rope_parameters`` (5)."""
    params = take("rope_parameters", None)
    scaling = take("rope_scaling", None)
    theta = take("rope_theta", None)
    if params is not None:
        theta = params.get("rope_theta", theta)
        scaling = params if scaling is None else scaling
    theta = 10000.0 if theta is None else float(theta)
    if scaling is None:
        return theta, None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise UnsupportedModelError(
            f"rope scaling type {rope_type!r} is not supported (supported: default, llama3)"
        )
    return theta, RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
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
