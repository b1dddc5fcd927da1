"""Scale groups: which op absorbs ``1/s`` and which linears take ``s`` (AWQ_SPEC.md section 2).

Data, not classes: one table serves every Llama-family model (Llama 2/3, Mistral, Qwen2/3,
SmolLM), identical to AutoAWQ's and llm-awq's. Paths are relative to one decoder layer's params.

| previous op              | scaled linears | loss measured on         |
|--------------------------|----------------|--------------------------|
| input_layernorm          | q, k, v        | the attention sub-block  |
| v_proj                   | o_proj         | o_proj                   |
| post_attention_layernorm | gate, up       | the MLP                  |
| up_proj                  | down_proj      | down_proj                |

The v->o group needs v's outputs to line up with o's inputs: true for multi-head attention.
With grouped-query attention the references skip it; ``gqa_vo=True`` adds it with one scale per
kv channel (``num_kv_heads * head_dim``), repeated over the query heads that read that kv head.
"""

from __future__ import annotations

import dataclasses

from awq_jax.config import ModelConfig

__all__ = ["ScaleGroup", "scale_groups"]

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ScaleGroup:
    """One smoothing step of a decoder layer.

    Attributes:
      name: short label used in records and progress output.
      prev: params path of the op that absorbs ``1 / s`` (an RMSNorm or a linear).
      linears: params paths of the linears whose input channels are multiplied by ``s``.
      inspect: what the loss is measured on: ``"attention"``, ``"mlp"``, or ``"linear"`` (the
        single scaled linear itself).
      shared_kv: the GQA v->o variant: ``s`` has ``num_kv_heads * head_dim`` entries and is
        repeated over each kv head's query heads on the linears' side.
    """

    name: str
    prev: Path
    linears: tuple[Path, ...]
    inspect: str
    shared_kv: bool = False


_QKV = ScaleGroup(
    "qkv",
    ("input_layernorm",),
    (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj")),
    "attention",
)
_VO = ScaleGroup("o", ("self_attn", "v_proj"), (("self_attn", "o_proj"),), "linear")
_GATE_UP = ScaleGroup(
    "gate_up", ("post_attention_layernorm",), (("mlp", "gate_proj"), ("mlp", "up_proj")), "mlp"
)
_DOWN = ScaleGroup("down", ("mlp", "up_proj"), (("mlp", "down_proj"),), "linear")


def scale_groups(config: ModelConfig, *, gqa_vo: bool = False) -> tuple[ScaleGroup, ...]:
    """The scale groups of one layer, in the order they are searched and recorded."""
    if config.num_heads == config.num_kv_heads:
        vo: tuple[ScaleGroup, ...] = (_VO,)
    elif gqa_vo:
        vo = (dataclasses.replace(_VO, shared_kv=True),)
    else:
        vo = ()  # the references' behaviour for GQA
    return (_QKV, *vo, _GATE_UP, _DOWN)
