"""What llmkit needs to know about each supported architecture: module names, one table.

The llama family (Llama, Mistral, Qwen2, Qwen3) shares its names; a new family is a new row,
not new code.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmkit.errors import LlmkitError


@dataclass(frozen=True, slots=True)
class Smoothable:
    """Linears reading the output of `source` (a norm or a Linear), so a per-channel scale
    can be divided out of `source` and multiplied into their input columns exactly."""

    source: str
    linears: tuple[str, ...]
    block: str = ""  # the module whose output AWQ scores a scale by ("": the one Linear)


@dataclass(frozen=True, slots=True)
class Arch:
    layers: str  # prefix of decoder layer i is f"{layers}.{i}"
    embed: str
    final_norm: str
    lm_head: str
    rotary: str
    smoothable: tuple[Smoothable, ...]
    # AWQ's scale groups, in compute order (v -> o only applies when their shapes match).
    awq_groups: tuple[Smoothable, ...]
    # Linears sharing one input, in compute order: GPTQ's true-sequential stages.
    stages: tuple[tuple[str, ...], ...]
    # The decoder layer's pieces: h = x + attention(input_norm(x)); y = h + mlp(post_norm(h)).
    input_norm: str = "input_layernorm"
    attention: str = "self_attn"
    post_norm: str = "post_attention_layernorm"
    mlp: str = "mlp"

    @property
    def linears(self) -> tuple[str, ...]:
        """Every Linear of a decoder layer, in the order they compute."""
        return tuple(name for stage in self.stages for name in stage)


LLAMA_FAMILY = Arch(
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    rotary="model.rotary_emb",
    smoothable=(
        Smoothable("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        Smoothable("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        Smoothable("mlp.up_proj", ("mlp.down_proj",)),
    ),
    awq_groups=(
        Smoothable(
            "input_layernorm",
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "self_attn",
        ),
        Smoothable("self_attn.v_proj", ("self_attn.o_proj",)),
        Smoothable("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        Smoothable("mlp.up_proj", ("mlp.down_proj",)),
    ),
    stages=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)
ARCHS = {
    "llama": LLAMA_FAMILY,
    "mistral": LLAMA_FAMILY,
    "qwen2": LLAMA_FAMILY,
    "qwen3": LLAMA_FAMILY,
}


def arch_for(config: dict) -> Arch:
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise LlmkitError(
            f"model type {model_type!r} is not supported for calibrated quantization; "
            f"supported: {', '.join(sorted(ARCHS))}"
        )
    return ARCHS[model_type]


def num_layers(config: dict) -> int:
    return int(config["num_hidden_layers"])


def is_layer_linear(arch: Arch, name: str) -> bool:
    """Is `name` the weight of a Linear inside a decoder layer (what INT8/INT4 quantize)?"""
    prefix, _, rest = name.partition(f"{arch.layers}.")
    if prefix or not rest.endswith(".weight"):
        return False
    module = rest.split(".", 1)[1].removesuffix(".weight") if "." in rest else ""
    return module in arch.linears
