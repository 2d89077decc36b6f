"""The model families llmkit runs: one table, read by every part that walks a model's tensors.

An entry names a family's modules and says how they relate: which Linears read one input
(and so fuse into one product, under the name vLLM gives it), which split their outputs and
which their inputs over tensor-parallel ranks, which whole heads a split must keep, the size
of each Linear in config.json's terms, and which norms, scales and groups quantization uses.
`shard`'s split rules (arch/plan.py), the shape check when a checkpoint opens
(arch/shapes.py), quantization's layer walk, the runtime loader and the vLLM layout writer
all read it; none keeps a list of its own. What varies within a family without changing the
math (q/k/v biases, Qwen3's per-head q/k norms) is read from the tensors a checkpoint holds.

A new family with the same math is one entry in FAMILIES; one whose math differs also needs
a model module in runtime/models/ (docs/architecture.md walks through both).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from llmkit.errors import LlmkitError

# How a module's tensors are split over tensor-parallel ranks.
COLWISE, ROWWISE, VOCAB, REPLICATE, DROP = "colwise", "rowwise", "vocab", "replicate", "drop"


@dataclass(frozen=True, slots=True)
class Linear:
    """One Linear of a block: its name in the block, its [out, in] as names of config sizes
    (see `sizes`), and the heads a tensor-parallel split must keep whole ("q", "kv")."""

    name: str
    out: str
    inputs: str
    heads: str | None = None


@dataclass(frozen=True, slots=True)
class Block:
    """Attention or MLP: `norm` (in the layer) -> the `inputs` Linears, which read the same
    activations and run as one product named `fused` (column-parallel) -> `output`
    (row-parallel: each rank's partial sums are added)."""

    name: str
    norm: str
    inputs: tuple[Linear, ...]
    fused: str
    output: Linear

    def linears(self) -> tuple[Linear, ...]:
        return (*self.inputs, self.output)


@dataclass(frozen=True, slots=True)
class Smoothable:
    """Linears reading the output of `source` (a norm or a Linear), so a per-channel scale
    can be divided out of `source` and multiplied into their input columns exactly."""

    source: str
    linears: tuple[str, ...]
    block: str = ""  # the module whose output AWQ scores a scale by ("": the one Linear)


@dataclass(frozen=True, slots=True)
class Family:
    """One model family's layout. Names inside a decoder layer are relative to the layer
    (f"{layers}.{i}"); the others are whole module names."""

    layers: str
    embed: str
    final_norm: str
    lm_head: str
    dropped: tuple[str, ...]  # patterns of modules recomputed at load (rotary tables)
    rotary: str
    blocks: tuple[Block, Block]  # attention, then MLP: h = x + attn(n1(x)); y = h + mlp(n2(h))
    head_norms: tuple[str, ...]  # per-head norms of q and k, replicated on every rank
    head_norms_required: bool  # the family always has them (config implies the tensors)
    smoothable: tuple[Smoothable, ...]
    awq_groups: tuple[Smoothable, ...]  # AWQ's scale groups, in compute order
    score_linears: tuple[str, ...]  # outputs meet in attention scores: AWQ does not clip them

    @property
    def attention(self) -> str:
        return self.blocks[0].name

    @property
    def mlp(self) -> str:
        return self.blocks[1].name

    @property
    def input_norm(self) -> str:
        return self.blocks[0].norm

    @property
    def post_norm(self) -> str:
        return self.blocks[1].norm

    @property
    def norms(self) -> tuple[str, ...]:
        """The norms of a decoder layer that every member has."""
        return tuple(block.norm for block in self.blocks)

    @property
    def stages(self) -> tuple[tuple[str, ...], ...]:
        """Linears sharing one input, in compute order (GPTQ's true-sequential stages)."""
        out: list[tuple[str, ...]] = []
        for block in self.blocks:
            out.append(tuple(f"{block.name}.{linear.name}" for linear in block.inputs))
            out.append((f"{block.name}.{block.output.name}",))
        return tuple(out)

    @property
    def linears(self) -> tuple[str, ...]:
        """Every Linear of a decoder layer, in the order they compute."""
        return tuple(name for stage in self.stages for name in stage)

    def layer_linears(self) -> tuple[tuple[str, str, Linear], ...]:
        """(name in the layer, split role, Linear) of every Linear of a decoder layer."""
        return tuple(
            (f"{block.name}.{linear.name}", ROWWISE if linear is block.output else COLWISE, linear)
            for block in self.blocks
            for linear in block.linears()
        )

    def fused_groups(self) -> dict[str, tuple[str, ...]]:
        """Fused product name -> the Linears it concatenates (outputs, in this order)."""
        return {
            f"{block.name}.{block.fused}": tuple(f"{block.name}.{lin.name}" for lin in block.inputs)
            for block in self.blocks
        }


_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
LLAMA = Family(
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    dropped=(r"(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb",),
    rotary="model.rotary_emb",
    blocks=(
        Block(
            name="self_attn",
            norm="input_layernorm",
            inputs=(
                Linear("q_proj", "q", "hidden", "q"),
                Linear("k_proj", "kv", "hidden", "kv"),
                Linear("v_proj", "kv", "hidden", "kv"),
            ),
            fused="qkv_proj",
            output=Linear("o_proj", "hidden", "q", "q"),
        ),
        Block(
            name="mlp",
            norm="post_attention_layernorm",
            inputs=(Linear("gate_proj", "inter", "hidden"), Linear("up_proj", "inter", "hidden")),
            fused="gate_up_proj",
            output=Linear("down_proj", "hidden", "inter"),
        ),
    ),
    head_norms=("self_attn.q_norm", "self_attn.k_norm"),
    head_norms_required=False,
    smoothable=(
        Smoothable("input_layernorm", _ATTN),
        Smoothable("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        Smoothable("mlp.up_proj", ("mlp.down_proj",)),
    ),
    awq_groups=(
        Smoothable("input_layernorm", _ATTN, "self_attn"),
        Smoothable("self_attn.v_proj", ("self_attn.o_proj",)),  # only when their shapes match
        Smoothable("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        Smoothable("mlp.up_proj", ("mlp.down_proj",)),
    ),
    score_linears=("self_attn.q_proj", "self_attn.k_proj"),
)
QWEN3 = replace(LLAMA, head_norms_required=True)

# config.json's model_type -> its family's layout.
FAMILIES: dict[str, Family] = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": QWEN3}


def family_for(config: dict) -> Family:
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise LlmkitError(
            f"llmkit knows the {', '.join(FAMILIES)} families, not model_type {model_type!r}"
        )
    return FAMILIES[model_type]


def num_layers(config: dict) -> int:
    return int(config["num_hidden_layers"])


def sizes(config: dict) -> dict[str, int]:
    """The sizes a Linear's `out`/`inputs` name, from config.json."""
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    return {
        "hidden": hidden,
        "q": heads * head_dim,
        "kv": kv_heads * head_dim,
        "inter": int(config["intermediate_size"]),
        "head_dim": head_dim,
        "vocab": int(config["vocab_size"]),
    }


def padded_vocab(vocab: int, multiple: int) -> int:
    """The vocabulary rounded up to a multiple of `multiple` (zero rows appended)."""
    return -(-vocab // multiple) * multiple


def is_layer_linear(family: Family, name: str) -> bool:
    """Is `name` the weight of a Linear inside a decoder layer (what INT8/INT4 quantize)?"""
    prefix, _, rest = name.partition(f"{family.layers}.")
    if prefix or not rest.endswith(".weight"):
        return False
    module = rest.split(".", 1)[1].removesuffix(".weight") if "." in rest else ""
    return module in family.linears
